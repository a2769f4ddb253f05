"""Typed configuration: dataclass defaults, YAML presets, Flower run-config overrides.

A run's configuration is built in three layers, later ones winning:

1. the dataclass defaults below (the embedded default: real MNIST, the MLP, 10 + 5 clients);
2. a YAML preset from ``conf/`` (only the keys it changes), selected by name or path;
3. overrides as flat dotted keys, e.g. ``{"train.lr": 0.01}``, which is what Flower's
   ``--run-config``/``-c`` delivers in ``context.run_config``.

Every key is validated on the way in: an unknown key, a wrong type or an out-of-range value raises
:class:`ConfigError` whose message is one line naming the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# Run-config values that mean "not set on the command line, keep the preset's value".
# Flower cannot express a missing value, so pyproject.toml declares every key with this sentinel.
UNSET = ""
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class ConfigError(ValueError):
    """A configuration problem, reported as one line that names the key or file."""


def _check(min: float | None = None, max: float | None = None, gt: float | None = None):
    return {"min": min, "max": max, "gt": gt}


@dataclass
class RunSection:
    """What the run is and where it writes."""

    name: str = "mnist_mlp"
    seed: int = field(default=0, metadata=_check(min=0))
    method: str = "hyperfedzero"
    rounds: int = field(default=20, metadata=_check(min=1))
    eval_every: int = field(default=1, metadata=_check(min=1))
    output_dir: str = "outputs"
    resume: bool = False
    # "auto": CUDA if available, else MPS where present, else the CPU; or "cpu", "cuda", "cuda:N",
    # "mps". Asking for a device this machine lacks is a one-line error (hfz_app.methods.runtime).
    device: str = "auto"


@dataclass
class ShiftSection:
    """Per-client intra-domain feature shift; each client draws its parameters from these ranges."""

    enabled: bool = False
    rotation_deg: float = field(default=20.0, metadata=_check(min=0, max=180))
    brightness: float = field(default=0.2, metadata=_check(min=0, max=1))
    contrast: float = field(default=0.3, metadata=_check(min=0, max=1))
    blur_sigma: float = field(default=1.0, metadata=_check(min=0))
    noise_std: float = field(default=0.1, metadata=_check(min=0))


@dataclass
class DataSection:
    """Which dataset, and how it is split into participating and held-out clients."""

    dataset: str = "mnist"
    data_dir: str = ""  # local folder for the `folder` source; empty: the dataset's default
    # true: generated data of the dataset's input shape and class count instead of the dataset
    # (offline, no download): checks that a preset runs end to end; its accuracies mean nothing
    synthetic: bool = False
    num_participants: int = field(default=10, metadata=_check(min=1))
    num_heldout: int = field(default=5, metadata=_check(min=0))
    alpha_dir: float = field(default=0.3, metadata=_check(gt=0))
    alpha_dir_heldout: float = field(default=0.0, metadata=_check(min=0))  # 0: same as alpha_dir
    min_partition_size: int = field(default=20, metadata=_check(min=1))
    local_test_fraction: float = field(default=0.2, metadata=_check(gt=0, max=0.9))
    train_subsample: int = field(default=0, metadata=_check(min=0))  # 0: the whole train split
    test_subsample: int = field(default=0, metadata=_check(min=0))  # 0: the whole test split
    # Style shift (MNIST-M-like, hfz_app/data/style.py): grayscale images blended into crops of
    # photographs from K style sources; each client's mix ~ Dirichlet(style_alpha) over them.
    style: bool = False
    style_sources: str = "space,warm,texture,scenery"  # comma-separated, docs/DATA.md
    style_alpha: float = field(default=0.5, metadata=_check(gt=0))
    style_alpha_heldout: float = field(default=0.0, metadata=_check(min=0))  # 0: style_alpha
    shift: ShiftSection = field(default_factory=ShiftSection)


@dataclass
class ModelSection:
    """The target network and the HyperFedZero modules around it (docs/DESIGN.md)."""

    target: str = "mlp"
    generate: str = "all"  # "all", "head", or comma-separated parameter-name prefixes
    conditioning: Literal["param", "input"] = "param"
    # What one generated weight set serves: each input ("sample"), the mean embedding of the local
    # batch ("batch"), or -- at evaluation -- the mean over all of a client's unlabelled inputs
    # ("client"; in training a batch, whose samples all come from the one client).
    granularity: Literal["sample", "batch", "client"] = "sample"
    embedding: Literal["learned", "uniform"] = "learned"
    # "labels": tie embedding dimension k to class k on every client (an auxiliary cross-entropy
    # on e with weight anchor_weight; needs embed_dim = number of classes), so that a pooled
    # embedding means the same thing everywhere: an estimate of the client's label frequencies.
    anchor: Literal["none", "labels"] = "none"
    anchor_weight: float = field(default=1.0, metadata=_check(min=0))
    hyper_input: Literal["prob", "log"] = "prob"  # what h sees: e, or its centred log
    embed_dim: int = field(default=16, metadata=_check(min=0))  # 0: one per class
    noisy_embed: bool = True
    noise_at_eval: bool = False
    chunk_layout: Literal["row", "flat"] = "row"
    chunk_size: int = field(default=256, metadata=_check(min=1))  # flat layout only
    chunk_embed_dim: int = field(default=8, metadata=_check(min=1))
    hidden: str = "64"  # hypernetwork hidden widths, comma-separated
    extractor_hidden: int = field(default=64, metadata=_check(min=1))
    # Extractor trunk: "cnn" (2-layer CNN), "mlp", "pooled_mlp" (2x2 average pooling, then the
    # MLP trunk), or "auto": the CNN for convolutional targets on images with H, W >= 16, else the
    # MLP. The MLP target gets the MLP trunk under "auto" because on CPU the CNN trunk costs ~4x
    # the 784-64 MLP trunk (fwd+bwd, batch 64), more than the plain MLP's whole training step
    # (docs/benchmarks/step_time.md); for the same reason the Fashion-MNIST/LeNet-S preset sets
    # "pooled_mlp" (same accuracy, fewer weights to send: docs/DESIGN.md, "Modules"). "backbone"
    # (with generate: head): no trunk of its own; f and noisy read the target's own features, the
    # input of the generated head, so the extractor costs two small linear layers (it failed to
    # train on one Fashion-MNIST seed of three).
    extractor: Literal["auto", "cnn", "mlp", "pooled_mlp", "backbone"] = "auto"
    residual: bool = True
    # true: factorised forward wherever it costs fewer FLOPs than materialising per-sample weights
    # (every Linear; convs with few output positions), materialised elsewhere; false: materialise
    # everything. Both are exact (tests/test_factorised.py); row layout only.
    factorised: bool = True
    compile: bool = False  # torch.compile the forward (fused factorised kernels); off: compile time
    alpha: float = field(default=0.01, metadata=_check(min=0))  # balancing penalty weight
    beta: float = field(default=0.0, metadata=_check(min=0))  # sharpness (entropy) weight
    # BatchNorm running statistics, for every method alike: "shared" (averaged with the weights,
    # as FedAvg and Flower's PyTorch template do) or "local" (FedBN: they stay on each participant;
    # the server and held-out clients then only have the initial ones).
    bn_stats: Literal["shared", "local"] = "shared"

    def hidden_widths(self) -> tuple[int, ...]:
        try:
            widths = tuple(int(w) for w in str(self.hidden).split(",") if w.strip())
        except ValueError:
            raise ConfigError(
                f"model.hidden: expected comma-separated positive integers, got {self.hidden!r}"
            ) from None
        if not widths or min(widths) < 1:
            raise ConfigError(f"model.hidden: expected positive integers, got {self.hidden!r}")
        return widths


@dataclass
class TrainSection:
    """Local training on a client."""

    local_epochs: int = field(default=1, metadata=_check(min=1))
    batch_size: int = field(default=64, metadata=_check(min=1))
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = field(default=0.05, metadata=_check(gt=0))
    momentum: float = field(default=0.9, metadata=_check(min=0, max=1))
    weight_decay: float = field(default=0.0, metadata=_check(min=0))
    # Each hypernetwork output-layer entry moves many generated values at once (SPEC: ~lr / (H *
    # E|hid| + 1)). Through the app, MNIST/MLP, 8 rounds, SGD lr 0.05 momentum 0.9: zACC 51.62
    # at 0.1, 93.65 at 0.01 (docs/compare_hyper_output_lr.md).
    hyper_output_lr_scale: float = field(default=0.01, metadata=_check(gt=0))
    extractor_lr_scale: float = field(default=1.0, metadata=_check(gt=0))
    torch_threads: int = field(default=0, metadata=_check(min=0))  # 0: torch's default
    # Label-prior augmentation: each local batch draws its label mix from Dir(prior_alpha) over
    # the client's classes (0: plain shuffled batches). See hfz_app.training.batch_indices. Used
    # by methods that condition on the batch (HyperFedZero); baselines ignore it.
    prior_alpha: float = field(default=0.0, metadata=_check(min=0))
    # Mixed precision on CUDA: forward and loss under bfloat16 autocast (no loss scaling needed).
    # Ignored on the CPU and MPS, so CPU results never depend on it. Evaluation stays float32.
    amp: bool = False


@dataclass
class EvalSection:
    """Evaluation on held-out clients, for every method alike."""

    # Label-free test-time steps on a held-out client before it is scored (no label, no gradient
    # step: still zero-shot). "adabn": BatchNorm statistics re-estimated from the client's own
    # unlabelled inputs in one pass (AdaBN). "em_prior": the client's label prior estimated by EM
    # from its unlabelled inputs and the logits corrected to it (Saerens et al. 2002; training prior
    # taken as uniform, hfz_app/evaluation/prior.py). "adabn+em_prior": both, in that order.
    heldout_adapt: Literal["none", "adabn", "em_prior", "adabn+em_prior"] = "none"
    # Clients scored on each evaluation round: a sample of this many participants (pACC) and of
    # this many held-out clients (zACC), drawn anew each evaluation round from the run's seed;
    # 0: every one. With 1,000 participants, scoring all of them each round costs 10x a round's
    # training at server.fraction_train=0.1 (docs/benchmarks/scale.md).
    participants_sample: int = field(default=0, metadata=_check(min=0))
    heldout_sample: int = field(default=0, metadata=_check(min=0))


@dataclass
class ServerSection:
    """Server-side aggregation and node sampling."""

    fraction_train: float = field(default=1.0, metadata=_check(gt=0, max=1))
    min_train_nodes: int = field(default=1, metadata=_check(min=1))
    server_momentum: float = field(default=0.0, metadata=_check(min=0, max=0.999))
    server_lr: float = field(default=1.0, metadata=_check(gt=0))
    # "fedavgm": FedAvg plus optional momentum (server_momentum, server_lr); "fedadam": Flower's
    # FedAdam (Reddi et al. 2021) on the shared arrays, with the fedadam_* settings below.
    optimizer: Literal["fedavgm", "fedadam"] = "fedavgm"
    fedadam_eta: float = field(default=0.01, metadata=_check(gt=0))
    fedadam_beta_1: float = field(default=0.9, metadata=_check(min=0, max=0.999))
    fedadam_beta_2: float = field(default=0.99, metadata=_check(min=0, max=0.9999))
    fedadam_tau: float = field(default=1e-3, metadata=_check(gt=0))
    timeout_s: float = field(default=3600.0, metadata=_check(gt=0))
    # Stop the run (one line, non-zero exit) after this many consecutive rounds in which no train
    # reply could be averaged (all failed, lost, or dropped as non-finite): the model is no longer
    # changing, so "completed" would be a lie (train.lr=inf drops every reply).
    max_failed_rounds: int = field(default=3, metadata=_check(min=1))


@dataclass
class PrivacySection:
    """Central differential privacy with Flower's fixed-clipping wrappers (docs/PRIVACY.md).

    ``dp``: "none"; "server" (DifferentialPrivacyServerSideFixedClipping: the server clips each
    update); "client" (DifferentialPrivacyClientSideFixedClipping + Flower's fixedclipping_mod on
    the nodes). Epsilon at ``delta`` is accounted with Flower's RDP accountant (dp-accounting)."""

    dp: Literal["none", "server", "client"] = "none"
    noise_multiplier: float = field(default=0.0, metadata=_check(min=0))
    clipping_norm: float = field(default=1.0, metadata=_check(gt=0))
    delta: float = field(default=1e-5, metadata=_check(gt=0, max=0.5))
    # "no-amplification": no credit for sampling (Flower's accounted mode); "poisson": q = m / P
    accounting: Literal["no-amplification", "poisson"] = "no-amplification"
    # equal client weights, as the Gaussian mechanism's sensitivity C / m assumes; false: FedAvg's
    # num-examples weights (the accountant's epsilon then does not hold for large clients)
    uniform_weights: bool = True


# -- the baselines' own settings (read only by the method that owns them) ------------------------


@dataclass
class FedProxSection:
    """FedProx (Li et al. 2020): the proximal weight mu of (mu/2)||w - w_global||^2."""

    mu: float = field(default=0.01, metadata=_check(min=0))


@dataclass
class DittoSection:
    """Ditto (Li et al. 2021): a personal model pulled towards the global one with weight lam."""

    lam: float = field(default=0.1, metadata=_check(min=0))
    personal_lr: float = field(default=0.0, metadata=_check(min=0))  # 0: train.lr
    personal_epochs: int = field(default=1, metadata=_check(min=1))


@dataclass
class PFedMeSection:
    """pFedMe (Dinh et al. 2020): Moreau-envelope personal model, K inner steps per batch."""

    lam: float = field(default=15.0, metadata=_check(gt=0))
    inner_steps: int = field(default=5, metadata=_check(min=1))
    personal_lr: float = field(default=0.05, metadata=_check(gt=0))
    # The shared model's step towards the personal one, w <- w - eta*lam*(w - theta): with large
    # lam, SGD on the Moreau envelope with rate eta. Chosen on MNIST/MLP seed 0 by pACC over
    # 0.05 / 0.2 / 0.5 / 1 (94.47 / 96.84 / 97.60 / 97.05): `python -m benchmarks.sweep --sweep
    # mnist --only-cells pfedme --seeds 0 --variant eta0.2=pfedme.eta=0.2 ...`, results in
    # benchmarks/results/pfedme_eta.jsonl and docs/RESULTS.md. (Until then pFedMe
    # stepped with train.lr, 0.05: effectively 10x slower than FedAvg's SGD with momentum 0.9.)
    eta: float = field(default=0.5, metadata=_check(gt=0))


@dataclass
class FedJetsSection:
    """FedJets (Dun et al. 2023), simplified: E expert target networks and a shared top-k gate."""

    # a module each: a count beyond this is a typo, and building it would hang (issue 21)
    num_experts: int = field(default=4, metadata=_check(min=1, max=4096))
    top_k: int = field(default=2, metadata=_check(min=1))
    gate_hidden: int = field(default=64, metadata=_check(min=1))
    balance: float = field(default=0.01, metadata=_check(min=0))  # load-balancing loss weight


@dataclass
class ScaffoldSection:
    """SCAFFOLD (Karimireddy et al. 2020): its local step eta_l on the corrected gradient."""

    # 0: train.lr. With plain SGD (momentum 0, as the paper analyses) 0.2 was the best pACC of
    # 0.05 / 0.2 / 0.5 on the mnist sweep, seed 0 (benchmarks/results/tuning_paper_baselines.jsonl);
    # with the other methods' momentum 0.9 the best was 88.7 (lr 0.02)
    lr: float = field(default=0.2, metadata=_check(min=0))
    # SGD momentum of the corrected local steps (train.momentum is the other methods')
    momentum: float = field(default=0.0, metadata=_check(min=0, max=0.999))


@dataclass
class FedAMPSection:
    """FedAMP (Huang et al. 2021): attention xi_ij = alpha_k exp(-||w_i - w_j||^2 / sigma) / sigma
    on the other participants' models; the client's proximal weight is lam / alpha_k."""

    # The attention's scale, screened as sigma with alpha_k = sigma / 10 (with 10 participants
    # xi_ii >= 0 needs alpha_k <= sigma / 9) on the mnist sweep, seed 0, by pACC: sigma 1 / 10 /
    # 100 / 1000 gave 94.9 / 95.5 / 96.5 / 96.4 (mnist.jsonl, tuning_paper_baselines.jsonl).
    # At sigma 1 the squared distances between participants' models (7-25 after a round or two
    # on MNIST/MLP) made every exp(-d/sigma) ~ 0: no message passing at all.
    alpha_k: float = field(default=10.0, metadata=_check(gt=0))
    sigma: float = field(default=100.0, metadata=_check(gt=0))
    lam: float = field(default=0.01, metadata=_check(min=0))


@dataclass
class PeFLLSection:
    """PeFLL (Scott et al. 2024): an embedding network phi pools a client's inputs into a
    descriptor v; a hypernetwork h(v) generates the target's weights (inputs only: embed_y off)."""

    embed_dim: int = field(default=16, metadata=_check(min=1))
    embed_hidden: int = field(default=64, metadata=_check(min=1))
    hyper_hidden: int = field(default=64, metadata=_check(min=1))
    rank: int = field(default=4, metadata=_check(min=1))  # width of h's last hidden layer
    # step of phi and h on the VJP: 0.1 was the best pACC of 1 / 0.3 / 0.1 on the mnist sweep, seed 0
    # (1 diverged: every reply non-finite by round 8-11; 0.3: 90.00, 0.1: 90.72)
    hyper_lr: float = field(default=0.1, metadata=_check(gt=0))
    # global-norm clip of that step (0: off; pFedHN's code clips at 50). Without it Fashion-MNIST/
    # LeNet-S seed 0 diverged (spikes of 18-224 in the norm, stable rounds 1-7). On the mnist
    # sweep, seed 0, pACC: 90.7 without, 79.6 at 10, 95.2 at 50 (tuning_paper_baselines.jsonl)
    clip_norm: float = field(default=50.0, metadata=_check(min=0))


@dataclass
class FineTuneSection:
    """The labelled reference: FedAvg, then `steps` SGD steps on each held-out client's labels."""

    steps: int = field(default=20, metadata=_check(min=0))
    lr: float = field(default=0.01, metadata=_check(gt=0))
    labelled_fraction: float = field(default=0.2, metadata=_check(gt=0, max=0.9))


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    server: ServerSection = field(default_factory=ServerSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    fedprox: FedProxSection = field(default_factory=FedProxSection)
    ditto: DittoSection = field(default_factory=DittoSection)
    pfedme: PFedMeSection = field(default_factory=PFedMeSection)
    fedjets: FedJetsSection = field(default_factory=FedJetsSection)
    scaffold: ScaffoldSection = field(default_factory=ScaffoldSection)
    fedamp: FedAMPSection = field(default_factory=FedAMPSection)
    pefll: PeFLLSection = field(default_factory=PeFLLSection)
    finetune: FineTuneSection = field(default_factory=FineTuneSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Flat dotted keys (``data.shift.enabled``) -> values; the run-config vocabulary."""
        return flatten(self.to_dict())


# ---------------------------------------------------------------------------------------------
# Building and validating


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections -> flat dotted keys (``{"data": {"seed": 0}}`` -> ``{"data.seed": 0}``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: '{part}' is a value, not a section")
        node[leaf] = value
    return tree


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any, meta: Mapping[str, Any]) -> Any:
    """Return ``value`` as type ``tp`` or raise a one-line ConfigError naming ``key``."""
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or value != int(value)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        value = int(value)
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):  # nan passes every range check; inf trains to nothing
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if meta.get("gt") is not None and not value > meta["gt"]:
        raise ConfigError(f"{key}: expected a value > {meta['gt']}, got {value!r}")
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"{key}: expected a value >= {meta['min']}, got {value!r}")
    if meta.get("max") is not None and value > meta["max"]:
        raise ConfigError(f"{key}: expected a value <= {meta['max']}, got {value!r}")
    return value


def _build(cls: type, tree: Mapping[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(tree) - set(fields))
    if unknown:
        where = f"section '{prefix.rstrip('.')}'" if prefix else "the top level"
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key in {source} (known in {where}: "
            f"{', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in tree.items():
        tp, key = hints[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
            kwargs[name] = _build(tp, value, key + ".", source)
        else:
            kwargs[name] = _coerce(key, value, tp, fields[name].metadata)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def preset_path(preset: str) -> Path:
    """Resolve a preset name (``mnist_mlp``) or a path to a YAML file."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = CONF_DIR / f"{preset}.yaml"
    if candidate.exists():
        return candidate
    known = ", ".join(sorted(p.stem for p in CONF_DIR.glob("*.yaml")))
    raise ConfigError(f"preset: no preset named {preset!r} (known: {known}; or a .yaml path)")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{line} is not valid YAML ({getattr(err, 'problem', err)})")
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return tree


def read_preset(preset: str, _seen: tuple[str, ...] = ()) -> tuple[dict[str, Any], str]:
    """A preset's tree and its file; ``extends: other`` starts from another preset (ablations and
    baselines are one key away from their base preset)."""
    path = preset_path(preset)
    if str(path) in _seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself ({' -> '.join(_seen)})")
    tree = read_yaml(path)
    base = tree.pop("extends", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: extends: expected a preset name, got {base!r}")
        base_tree, _ = read_preset(base, (*_seen, str(path)))
        tree = _merge(base_tree, tree)
    _build(Config, tree, "", str(path))  # report preset errors against the file
    return tree, str(path)


def load_config(
    preset: str | None = "mnist_mlp", overrides: Mapping[str, Any] | None = None
) -> Config:
    """Defaults <- YAML preset <- flat dotted overrides; validated, one-line errors."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if preset:
        tree, source = read_preset(preset)
    if overrides:
        cleaned = {k: v for k, v in overrides.items() if v != UNSET}
        tree = _merge(tree, _unflatten(cleaned))
        source = f"{source} + overrides" if preset else "overrides"
    cfg = _build(Config, tree, "", source)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that a single key's range cannot express. Names that a registry owns
    (``run.method``, ``model.target``, ``data.dataset``) are checked by that registry."""
    cfg.model.hidden_widths()
    check_run_name(cfg.run.name, "run.name")
    if not DEVICE_PATTERN.fullmatch(cfg.run.device):
        raise ConfigError(f"run.device: expected auto, cpu, cuda, cuda:N or mps, got "
                          f"{cfg.run.device!r}")
    if cfg.run.eval_every > cfg.run.rounds:
        raise ConfigError(
            f"run.eval_every: expected <= run.rounds ({cfg.run.rounds}), got {cfg.run.eval_every}"
        )
    if cfg.model.embed_dim == 1:
        raise ConfigError("model.embed_dim: expected 0 (one per class) or >= 2, got 1")
    if cfg.model.extractor == "backbone" and (cfg.model.generate != "head"
                                              or cfg.model.conditioning != "param"):
        raise ConfigError(
            "model.extractor: 'backbone' reads the generated head's input, so it needs "
            f"model.generate=head and model.conditioning=param (got {cfg.model.generate!r}, "
            f"{cfg.model.conditioning!r})")
    if cfg.fedjets.top_k > cfg.fedjets.num_experts:
        raise ConfigError(
            f"fedjets.top_k: expected <= fedjets.num_experts ({cfg.fedjets.num_experts}), "
            f"got {cfg.fedjets.top_k}"
        )
    if cfg.server.optimizer == "fedadam" and (cfg.server.server_momentum or cfg.server.server_lr != 1):
        raise ConfigError(
            "server.server_momentum: expected 0 (and server.server_lr 1) with "
            f"server.optimizer=fedadam, got {cfg.server.server_momentum} "
            f"(server_lr {cfg.server.server_lr}); FedAdam's own step is server.fedadam_eta"
        )
    for key, size, clients, count in (
            ("eval.participants_sample", cfg.eval.participants_sample, "data.num_participants",
             cfg.data.num_participants),
            ("eval.heldout_sample", cfg.eval.heldout_sample, "data.num_heldout",
             cfg.data.num_heldout)):
        if size > count:
            raise ConfigError(f"{key}: expected 0 (all) or at most {clients} ({count}), "
                              f"got {size}")
    if cfg.server.min_train_nodes > cfg.data.num_participants:
        raise ConfigError(
            f"server.min_train_nodes: expected <= data.num_participants "
            f"({cfg.data.num_participants}), got {cfg.server.min_train_nodes}"
        )


def check_run_name(name: str, key: str) -> None:
    """A run name is one folder inside the output folder: no path separator, no ``.``/``..``, so
    that a name from a shared config cannot write anywhere else (hfz_app.outputs also checks
    symlinks)."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0") or name != name.strip():
        raise ConfigError(f"{key}: expected a plain folder name (no '/', '\\', '..' or "
                          f"surrounding spaces; it is created inside run.output_dir), got {name!r}")


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """`key=value` pairs as Flower reads them (TOML values: strings quoted)."""
    out: dict[str, object] = {}
    for pair in pairs:
        for item in pair.split():
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"-c {item!r}: expected key=value")
            try:
                out[key] = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                out[key] = value  # an unquoted string; load_config reports a wrong type
    return out


def from_dict(tree: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Config:
    """A Config saved with ``Config.to_dict()`` (e.g. in a checkpoint), with flat dotted
    overrides; validated like any other."""
    return load_config(None, flatten(tree) | dict(overrides or {}))


def from_run_config(run_config: Mapping[str, Any]) -> Config:
    """Build the Config of a Flower run: ``preset`` picks the YAML, other keys override it."""
    values = dict(run_config)
    preset = str(values.pop("preset", "mnist_mlp") or "mnist_mlp")
    return load_config(preset, values)


def run_config_keys() -> dict[str, Any]:
    """Every overridable key with its default; pyproject.toml must declare exactly these."""
    return Config().flat()

