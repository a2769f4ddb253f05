"""Flower ClientApp of the zero-shot app: a role query and frozen evaluation, nothing else.

There is no train handler: a `train` message to this app is answered with an error.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from hfz_app.zeroshot import client

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return client.handle_query(msg, context)


@app.evaluate("zeroshot")
def zeroshot(msg: Message, context: Context) -> Message:
    return client.handle_zeroshot(msg, context)
