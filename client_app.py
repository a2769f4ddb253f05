"""Flower ClientApp of the training app: routes each message type to hfz_app.federation.client."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from hfz_app.federation import client
from hfz_app.federation.privacy import privacy_mod

app = ClientApp(mods=[privacy_mod])  # Flower's fixedclipping_mod when privacy.dp=client


@app.query()
def query(msg: Message, context: Context) -> Message:
    return client.handle_query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return client.handle_train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return client.handle_evaluate(msg, context)


@app.evaluate("zeroshot")
def zeroshot(msg: Message, context: Context) -> Message:
    return client.handle_zeroshot(msg, context)
