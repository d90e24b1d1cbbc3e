"""``RemoteModel``: the local API of a ``HookedTransformer``, run by a server (``server.py``).

    from transformer_hooks import remote

    model = remote.RemoteModel("http://127.0.0.1:8000", token=open("token.txt").read().strip())
    logits, cache = model.run_with_cache("The capital of France is", names_filter=["blocks.*.hook_resid_post"])
    cache.logit_attrs(cache.stack_head_results(-1, pos_slice=-1), " Paris", " London")  # DLA works
    patched = model.run_with_hooks(
        ["clean prompt", "corrupted prompt"],
        fwd_hooks=[remote.patch("blocks.3.hook_resid_pre", from_prompt=0, prompts=[1], pos=-1)],
    )

Hooks are declarative (``patch``, ``add``, ``steer``, ``set_value``, ``scale``, ``zero``,
``mean_ablate``): records the server applies, never code. The cache the client gets is an
``ActivationCache`` over a local shell of the model that holds only the weights its DLA
methods read (unembedding, norms, ``W_O``/``b_O``, ``W_out``/``b_out``), fetched once on
first use; every other weight stays on the meta device.

Errors: ``RemoteUnavailable`` (server down), ``RemoteTimeout``, ``RemoteAuthError`` (401),
``RemoteLimitError`` (a limit, named in ``.limit``), ``RemoteBadRequest`` (400: an unknown
site, a wrong shape, a bad selector), all ``RemoteError``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..cache import ActivationCache
from ..config import ModelConfig
from .schema import Intervention, Metric, decode_tensors, encode_tensors

__all__ = [
    "RemoteAuthError",
    "RemoteBadRequest",
    "RemoteError",
    "RemoteHook",
    "RemoteLimitError",
    "RemoteModel",
    "RemoteTimeout",
    "RemoteUnavailable",
    "add",
    "logit",
    "logit_diff",
    "mean_ablate",
    "patch",
    "scale",
    "set_value",
    "steer",
    "zero",
]


# Errors ----------------------------------------------------------------------------------------
class RemoteError(RuntimeError):
    """A request the server refused or could not run.

    Args:
        message: what went wrong (the server's message, with the URL).
        status: the HTTP status (0: none).
        limit: the token limit the request is past, if that is why.
    """

    def __init__(self, message: str, status: int = 0, limit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.limit = status, limit


class RemoteUnavailable(RemoteError):
    """The server cannot be reached (down, wrong address, restarting)."""


class RemoteTimeout(RemoteError):
    """The request took longer than its timeout (the client's or the server's)."""


class RemoteAuthError(RemoteError):
    """The server refused the token (401)."""


class RemoteLimitError(RemoteError):
    """The request is past one of its token's limits (or the body size); ``limit`` names it."""


class RemoteBadRequest(RemoteError, ValueError):
    """The server cannot run this request as given (400): the message names what is wrong."""


# Declarative hooks ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteHook:
    """One intervention, as data: the fields of ``schema.Intervention`` and its tensor, if any."""

    site: str
    op: str
    tensor: torch.Tensor | None = None
    coeff: float = 1.0
    from_prompt: int | None = None
    reference: Sequence[int] | None = None
    prompts: Sequence[int] | None = None
    pos: int | Sequence[int] | None = None
    head: int | Sequence[int] | None = None

    def spec(self, key: str | None) -> dict[str, Any]:
        """This hook as a ``schema.Intervention`` dict (validated here, before sending).

        Args:
            key: the key of its tensor in the request's ``tensors`` (None for a hook without one).
        """
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "tensor"}
        for k in ("reference", "prompts", "pos", "head"):
            if d[k] is not None and not isinstance(d[k], int):
                d[k] = [int(i) for i in d[k]]
        d["tensor"] = key
        return Intervention(**d).model_dump(exclude_defaults=True)  # validated here, before sending


def _vector(v: Any) -> torch.Tensor:
    return v.detach() if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=torch.float32)


def patch(site: str, from_prompt: int, *, pos: Any = None, head: Any = None, prompts: Any = None) -> RemoteHook:
    """Replace ``site`` by its clean value in prompt ``from_prompt`` of the same request.

    ``pos``, ``head`` and ``prompts`` select what is edited, as in ``schema.Intervention``: positions
    and heads (all when None; negative counts from the end) and the request's prompts (all when None).
    The other hooks below take them too.
    """
    return RemoteHook(site, "patch", from_prompt=from_prompt, pos=pos, head=head, prompts=prompts)


def add(
    site: str, vector: Any, *, coeff: float = 1.0, pos: Any = None, head: Any = None, prompts: Any = None
) -> RemoteHook:
    """Add ``coeff * vector`` (broadcast to the selection) to ``site``;
    ``pos``, ``head``, ``prompts`` as in ``patch``.
    """
    return RemoteHook(site, "add", _vector(vector), coeff, pos=pos, head=head, prompts=prompts)


def steer(site: str, vector: Any, coeff: float = 1.0, *, pos: Any = None, prompts: Any = None) -> RemoteHook:
    """A steering vector: ``site``'s activation becomes ``act + coeff * vector`` (in ``generate``:
    ``steering.steering``); ``pos``, ``prompts`` as in ``patch``.
    """
    return RemoteHook(site, "steer", _vector(vector), coeff, pos=pos, prompts=prompts)


def set_value(site: str, value: Any, *, pos: Any = None, head: Any = None, prompts: Any = None) -> RemoteHook:
    """Set ``site`` to ``value`` (broadcast to the selection); ``pos``, ``head``, ``prompts`` as in ``patch``."""
    return RemoteHook(site, "set", _vector(value), pos=pos, head=head, prompts=prompts)


def scale(site: str, factor: float, *, pos: Any = None, head: Any = None, prompts: Any = None) -> RemoteHook:
    """Multiply ``site`` by ``factor``; ``pos``, ``head``, ``prompts`` as in ``patch``."""
    return RemoteHook(site, "scale", coeff=factor, pos=pos, head=head, prompts=prompts)


def zero(site: str, *, pos: Any = None, head: Any = None, prompts: Any = None) -> RemoteHook:
    """Set ``site`` to zero; ``pos``, ``head``, ``prompts`` as in ``patch``."""
    return RemoteHook(site, "zero", pos=pos, head=head, prompts=prompts)


def mean_ablate(
    site: str, *, reference: Any = None, pos: Any = None, head: Any = None, prompts: Any = None
) -> RemoteHook:
    """Replace ``site`` by its mean over the ``reference`` prompts (default: all of the request's) at
    each position; ``pos``, ``head``, ``prompts`` as in ``patch``.
    """
    return RemoteHook(site, "mean_ablate", reference=reference, pos=pos, head=head, prompts=prompts)


def logit_diff(answer: int | str, contrast: int | str, pos: int = -1) -> dict[str, Any]:
    """The metric ``logits[:, pos, answer] - logits[:, pos, contrast]``, averaged over the batch."""
    return {"name": "logit_diff", "answer": answer, "contrast": contrast, "pos": pos}


def logit(answer: int | str, pos: int = -1) -> dict[str, Any]:
    """The metric ``logits[:, pos, answer]``, averaged over the batch."""
    return {"name": "logit", "answer": answer, "pos": pos}


# The model -------------------------------------------------------------------------------------------
class _RemoteCache(ActivationCache):
    """An ActivationCache whose model shell fetches the DLA weights the first time a method needs them."""

    _remote: "RemoteModel"

    def __getattribute__(self, name: str) -> Any:
        if name in _WEIGHT_METHODS:
            object.__getattribute__(self, "_remote")._load_dla_weights()
        return object.__getattribute__(self, name)


_WEIGHT_METHODS = frozenset(
    {
        "accumulated_resid",
        "decompose_resid",
        "compute_head_results",
        "stack_head_results",
        "get_neuron_results",
        "stack_neuron_results",
        "get_full_resid_decomposition",
        "apply_ln_to_stack",
        "logit_attrs",
    }
)


def _input(input: Any, prepend_bos: bool | None = None, padding_side: str | None = None) -> dict[str, Any]:
    """A model input (a string, strings, or token ids) as the request's fields."""
    d: dict[str, Any] = {}
    if isinstance(input, str):
        d["prompts"] = [input]
    elif isinstance(input, (list, tuple)) and input and all(isinstance(s, str) for s in input):
        d["prompts"] = list(input)
    else:
        t = torch.as_tensor(input)
        if t.dtype.is_floating_point or t.ndim not in (1, 2):
            raise ValueError(f"input: a string, a list of strings, or token ids [pos] / [batch, pos], got {t.shape}")
        d["tokens"] = (t[None] if t.ndim == 1 else t).tolist()
    if prepend_bos is not None:
        d["prepend_bos"] = prepend_bos
    if padding_side is not None:
        d["padding_side"] = padding_side
    return d


class RemoteModel:
    """A model served by ``python -m transformer_hooks serve``, used like a local one.

    Args:
        url: the server's address (``http://host:port``).
        token: the bearer token (default: the ``TRANSFORMER_HOOKS_TOKEN`` environment variable).
        timeout: seconds to wait for an answer (the server has its own limit too).
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 600.0) -> None:
        try:
            import httpx
        except ImportError:
            raise ImportError("RemoteModel needs httpx: pip install 'transformer_hooks[serve]'") from None
        self._httpx = httpx
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get("TRANSFORMER_HOOKS_TOKEN", "")
        self.timeout = timeout
        self._client = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.token}"} if self.token else {},
            timeout=httpx.Timeout(timeout, connect=10.0),
        )
        self.info = self._request("GET", "/info")
        self.cfg = ModelConfig.from_dict(self.info["cfg"])
        self.hook_names: list[str] = self.info["sites"]
        self._shell: Any = None
        self._dla_loaded = False
        self._single: dict[str, int] = {}

    def close(self) -> None:
        """Close the HTTP connection (``with RemoteModel(...)`` does this on exit)."""
        self._client.close()

    def __enter__(self) -> RemoteModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteModel({self.url!r}, model={self.info.get('model')!r}, {self.cfg.n_layers} layers)"

    # HTTP -----------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        httpx = self._httpx
        try:
            r = self._client.request(method, path, json=body)
        except httpx.TimeoutException:
            raise RemoteTimeout(f"{self.url}{path}: no answer within {self.timeout:g} s") from None
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as e:
            raise RemoteUnavailable(f"cannot reach the server at {self.url} ({type(e).__name__}: {e})") from None
        if r.status_code == 200:
            return r.json()
        try:
            content = r.json()
        except ValueError:
            content = {"error": r.text[:500]}
        message = f"{self.url}{path}: {r.status_code}: {content.get('error', content)}"
        limit = content.get("limit")
        if r.status_code == 401:
            raise RemoteAuthError(message, 401)
        if r.status_code == 504 or limit == "timeout":
            raise RemoteTimeout(message, r.status_code, limit)
        if limit is not None or r.status_code in (413, 429):
            raise RemoteLimitError(message, r.status_code, limit)
        if r.status_code == 400:
            raise RemoteBadRequest(message, 400)
        raise RemoteError(message, r.status_code)

    def _post(self, kind: str, body: dict[str, Any]) -> Any:
        return self._request("POST", f"/v1/{kind}", body)

    # Tokens -------------------------------------------------------------------------------------------
    def to_tokens(self, input: Any, prepend_bos: bool | None = None, padding_side: str | None = None) -> torch.Tensor:
        """The server's tokenization of ``input`` (a string or strings) as a [batch, pos] tensor;
        ``prepend_bos`` and ``padding_side`` as in ``HookedTransformer.to_tokens``.
        """
        out = self._post("tokenize", _input(input, prepend_bos, padding_side))
        return torch.tensor(out["tokens"], dtype=torch.long)

    def to_str_tokens(self, input: Any, prepend_bos: bool | None = None) -> list[str] | list[list[str]]:
        """The served tokenizer's string of each token of ``input`` (one list for one prompt);
        ``prepend_bos`` as in ``HookedTransformer.to_str_tokens``. ValueError if the model has no tokenizer.
        """
        out = self._post("tokenize", _input(input, prepend_bos))
        if out["str_tokens"] is None:
            raise ValueError("the served model has no tokenizer")
        single = isinstance(input, str) or (isinstance(input, torch.Tensor) and input.ndim == 1)
        return out["str_tokens"][0] if single else out["str_tokens"]

    def to_single_token(self, string: str) -> int:
        """The id of ``string``, tokenized without BOS (cached); ValueError unless it is exactly one token."""
        if string not in self._single:
            tokens = self.to_tokens(string, prepend_bos=False)
            if tokens.shape[1] != 1:
                raise ValueError(f"{string!r} is {tokens.shape[1]} tokens, not one")
            self._single[string] = int(tokens[0, 0])
        return self._single[string]

    def _token_id(self, t: int | str) -> int:
        return self.to_single_token(t) if isinstance(t, str) else int(t)

    # Forward ------------------------------------------------------------------------------------------
    def _names(self, names_filter: Any) -> list[str]:
        if names_filter is None:
            return list(self.info["cache_sites"])
        if callable(names_filter):
            return [n for n in self.info["cache_sites"] if names_filter(n)]
        return [names_filter] if isinstance(names_filter, str) else list(names_filter)

    def _run(
        self,
        input: Any,
        names: list[str],
        fwd_hooks: Sequence[RemoteHook],
        return_logits: bool,
        prepend_bos: bool | None,
        padding_side: str | None,
        attention_mask: Any,
    ) -> dict[str, torch.Tensor]:
        body = _input(input, prepend_bos, padding_side)
        if attention_mask is not None:
            body["attention_mask"] = torch.as_tensor(attention_mask).tolist()
        tensors: dict[str, torch.Tensor] = {}
        specs = []
        for i, h in enumerate(fwd_hooks):
            if not isinstance(h, RemoteHook):
                raise TypeError(
                    "a remote model runs declarative hooks only (remote.patch, remote.add, ...), not functions: "
                    f"got {type(h).__name__}"
                )
            key = None
            if h.tensor is not None:
                key = f"t{i}"
                tensors[key] = h.tensor
            specs.append(h.spec(key))
        body.update(sites=names, interventions=specs, tensors=encode_tensors(tensors), return_logits=return_logits)
        return decode_tensors(self._post("run", body)["tensors"])

    def __call__(
        self,
        input: Any,
        return_type: str | None = "logits",
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        attention_mask: Any = None,
    ) -> torch.Tensor | None:
        return self.run_with_hooks(
            input,
            return_type=return_type,
            prepend_bos=prepend_bos,
            padding_side=padding_side,
            attention_mask=attention_mask,
        )

    forward = __call__

    def run_with_hooks(
        self,
        input: Any,
        fwd_hooks: Sequence[RemoteHook] = (),
        return_type: str | None = "logits",
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        attention_mask: Any = None,
    ) -> torch.Tensor | None:
        """One forward with declarative hooks.

        Args:
            input: a prompt, prompts or token ids [batch, pos].
            fwd_hooks: ``RemoteHook``s (``remote.patch``, ``remote.add``, ...), applied in order.
            return_type: ``"logits"`` or None (nothing is sent back).
            prepend_bos: as in ``HookedTransformer.forward``.
            padding_side: as in ``HookedTransformer.forward``.
            attention_mask: with token ids only: [batch, pos] of 0/1.

        Returns:
            The logits [batch, pos, d_vocab], or None.
        """
        if return_type not in ("logits", None):
            raise ValueError(f"a remote forward returns 'logits' or None, got return_type={return_type!r}")
        out = self._run(input, [], fwd_hooks, return_type == "logits", prepend_bos, padding_side, attention_mask)
        return out.get("logits")

    def run_with_cache(
        self,
        input: Any,
        names_filter: Any = None,
        fwd_hooks: Sequence[RemoteHook] = (),
        return_type: str | None = "logits",
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        attention_mask: Any = None,
    ) -> tuple[torch.Tensor | None, ActivationCache]:
        """Logits and an ``ActivationCache`` of the sites ``names_filter`` selects.

        Args:
            input: a prompt, prompts or token ids [batch, pos].
            names_filter: a name, names, globs, or a predicate on names (None: every site).
            fwd_hooks: declarative hooks, applied before caching.
            return_type: ``"logits"`` or None; ``prepend_bos``, ``padding_side`` and ``attention_mask``
                as in ``run_with_hooks``.
        """
        names = self._names(names_filter)
        out = self._run(input, names, fwd_hooks, return_type == "logits", prepend_bos, padding_side, attention_mask)
        logits = out.pop("logits", None)
        cache = _RemoteCache(out, self._model_shell())
        cache._remote = self
        return logits, cache

    # The local shell the cache reads weights from ------------------------------------------------------
    def _model_shell(self) -> Any:
        if self._shell is None:
            from ..model import HookedTransformer

            dtype = getattr(torch, self.info["dtype"])
            with torch.device("meta"):
                shell: Any = HookedTransformer(self.cfg)
            # The model reads its device and dtype from W_E: a stride-0 stand-in costs nothing.
            shell.embed.W_E = torch.nn.Parameter(
                torch.zeros((), dtype=dtype).expand(self.cfg.d_vocab, self.cfg.d_model), requires_grad=False
            )
            # the server model's TransformerLens switches (model.tl_flags reads them from the config)
            shell.cfg = shell.cfg.replace(**dict.fromkeys(self.info["tl_flags"], True))
            # Strings (a DLA answer such as " Paris") are tokenized by the server.
            shell.to_single_token = self.to_single_token
            shell.to_tokens = self.to_tokens
            shell.to_str_tokens = self.to_str_tokens
            self._shell = shell
        return self._shell

    def _load_dla_weights(self) -> None:
        if self._dla_loaded:
            return
        from .jobs import DLA_WEIGHTS

        weights = self.parameters(DLA_WEIGHTS)
        self._model_shell().load_state_dict(weights, strict=False, assign=True)
        self._dla_loaded = True

    def parameters(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The served model's parameters, in the server's memory layout.

        Args:
            names: parameter names or globs (``"blocks.*.attn.W_O"``).
        """
        out = self._post("params", {"names": list(names)})
        params = decode_tensors(out["tensors"])
        for name, stride in out.get("strides", {}).items():  # the server's layout, so matmuls round alike
            t = params[name]
            params[name] = torch.empty_strided(t.shape, stride, dtype=t.dtype).copy_(t)
        return params

    @property
    def W_U(self) -> torch.Tensor:
        """The served model's unembedding [d_model, d_vocab] (fetched once, with the other DLA weights)."""
        self._load_dla_weights()
        return self._model_shell().W_U

    def tokens_to_residual_directions(self, tokens: Any) -> torch.Tensor:
        """The unembedding direction [d_model] of ``tokens`` (an id, ids, or a one-token string)."""
        self._load_dla_weights()
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        return self._model_shell().tokens_to_residual_directions(tokens)

    # Jobs -----------------------------------------------------------------------------------------------
    def _metric(self, metric: dict[str, Any]) -> dict[str, Any]:
        m = dict(metric)
        m["answer"] = self._token_id(m["answer"])
        if m.get("contrast") is not None:
            m["contrast"] = self._token_id(m["contrast"])
        return Metric(**m).model_dump()

    def patching_sweep(
        self, sweep: str, corrupted: Any, clean: Any, metric: dict[str, Any], metric_positions: int | None = None
    ) -> torch.Tensor:
        """Run ``patching.<sweep>(model, corrupted, model.run_with_cache(clean)[1], metric)`` on the server.

        Args:
            sweep: a ``get_act_patch_*`` name.
            corrupted: the corrupted prompt(s) or tokens.
            clean: the clean prompt(s) or tokens.
            metric: ``remote.logit_diff(answer, contrast)`` or ``remote.logit(answer)``.
            metric_positions: the sweep's ``metric_positions`` (None: the sweep's default).
        """
        body: dict[str, Any] = {
            "sweep": sweep,
            "clean": _input(clean),
            "corrupted": _input(corrupted),
            "metric": self._metric(metric),
        }
        if metric_positions is not None:
            body["metric_positions"] = metric_positions
        return decode_tensors(self._post("patch", body)["tensors"])["result"]

    def attribution_patch(
        self,
        sweep: str,
        corrupted: Any,
        clean: Any,
        metric: dict[str, Any],
        method: str = "atp",
        grad_drop: bool = False,
    ) -> torch.Tensor:
        """Run ``patching.<sweep>`` (a ``get_attr_patch_*``) on the server.

        Args:
            sweep: a ``get_attr_patch_*`` name.
            corrupted: the corrupted prompt(s) or tokens.
            clean: the clean prompt(s) or tokens.
            metric: ``remote.logit_diff(answer, contrast)`` or ``remote.logit(answer)``.
            method: ``"atp"`` (AtP) or ``"atp*"`` (AtP*).
            grad_drop: AtP*'s GradDrop.
        """
        body = {
            "sweep": sweep,
            "clean": _input(clean),
            "corrupted": _input(corrupted),
            "metric": self._metric(metric),
            "method": method,
            "grad_drop": grad_drop,
        }
        return decode_tensors(self._post("attribution", body)["tensors"])["result"]

    def __getattr__(self, name: str) -> Callable[..., torch.Tensor]:
        # model.get_act_patch_resid_pre(corrupted, clean, metric) and the other sweeps by name.
        if name.startswith("get_act_patch_"):
            return lambda corrupted, clean, metric, **kw: self.patching_sweep(name, corrupted, clean, metric, **kw)
        if name.startswith("get_attr_patch_"):
            return lambda corrupted, clean, metric, **kw: self.attribution_patch(name, corrupted, clean, metric, **kw)
        raise AttributeError(name)

    def direct_logit_attribution(self, prompt: str, answer: str, contrast: str, pos: int = -1) -> Any:
        """``dla.direct_logit_attribution`` of ``prompt`` on the server.

        Args:
            prompt: the prompt.
            answer: the answer token (a one-token string).
            contrast: the token the answer is compared with.
            pos: the position whose logits are attributed.

        Returns:
            A ``DLAResult``.
        """
        from ..analysis.dla import DLAResult

        out = self._post("dla", {"prompt": prompt, "answer": answer, "contrast": contrast, "pos": pos})
        fields: dict[str, Any] = {**out["fields"], **decode_tensors(out["tensors"])}
        return DLAResult(**fields)

    def logit_lens(
        self, input: Any, sites: Sequence[str] | None = None, pos_slice: int | None = None, top_k: int = 5
    ) -> Any:
        """``lens.logit_lens`` on the server.

        Args:
            input: a prompt, prompts or token ids.
            sites: the residual sites to read (None: the lens's default).
            pos_slice: the position to read (None: every position).
            top_k: how many top tokens per site.

        Returns:
            A ``LogitLens``.
        """
        from ..analysis.lens import LogitLens

        body = _input(input)
        body.update(lens_sites=None if sites is None else list(sites), pos=pos_slice, top_k=top_k)
        out = self._post("lens", body)
        fields: dict[str, Any] = {**out["fields"], **decode_tensors(out["tensors"])}
        return LogitLens(**fields)

    def generate(
        self,
        input: Any,
        max_new_tokens: int = 10,
        *,
        steering: Sequence[RemoteHook] = (),
        do_sample: bool = False,
        seed: int = 0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_at_eos: bool = True,
        prepend_bos: bool | None = None,
    ) -> Any:
        """``model.generate`` on the server, inside ``steering.steering`` for each steering hook.

        Strings in, strings out (one string for one); tokens in, tokens out.

        Args:
            input: a prompt, prompts or token ids [batch, pos].
            max_new_tokens: tokens to generate.
            steering: ``remote.steer``/``remote.add`` hooks.
            do_sample: sample (True) or take the argmax (False, the default).
            seed: the server's sampling seed.
            temperature: softmax temperature when sampling.
            top_k: sample among the ``top_k`` most likely tokens (None: all).
            top_p: nucleus sampling's probability mass (None: off).
            stop_at_eos: stop a sequence at its end-of-sequence token.
            prepend_bos: as in ``HookedTransformer.generate``.
        """
        body = _input(input, prepend_bos)
        tensors, specs = {}, []
        for i, h in enumerate(steering):
            tensors[f"t{i}"] = h.tensor
            specs.append(h.spec(f"t{i}"))
        body.update(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            seed=seed,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_at_eos=stop_at_eos,
            interventions=specs,
            tensors=encode_tensors(tensors),  # type: ignore[arg-type]
        )
        out = self._post("generate", body)
        if "text" in out:
            return out["text"][0] if isinstance(input, str) else out["text"]
        return torch.tensor(out["tokens"], dtype=torch.long)

    # What the server says about itself -------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """The server's ``/health`` answer (see ``server.Server.health``)."""
        return self._request("GET", "/health")
