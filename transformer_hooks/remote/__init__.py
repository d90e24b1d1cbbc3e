"""Remote execution: serve one model to many researchers, interventions as data.

    python -m transformer_hooks serve --model PATH --tokens tokens.txt      # on the machine with the model
    model = transformer_hooks.remote.RemoteModel(url, token=...)             # anywhere

``client.py`` (``RemoteModel`` and the declarative hooks), ``schema.py`` (what travels:
pydantic requests, tensors as safetensors), ``jobs.py`` (requests run on the model, batched),
``server.py`` (HTTP, tokens, limits), ``command.py`` (the ``serve`` command).
The client needs httpx, the server starlette and uvicorn: ``pip install 'transformer_hooks[serve]'``.
"""

from .client import *  # noqa: F403  # the client's names are the package's
from .client import __all__  # noqa: F401
