"""open_clip models, created offline, and their scored layers (DESIGN.md §2, CLIP).

Every model is ``open_clip.create_model(name, pretrained=None)``: open_clip's own configs
(``RN50``, ``ViT-B-32``, ...) and this package's small ones in
``ffengine/assets/clip-configs`` (registered with open_clip on import, configs as data):

* ``ffclip-vit-tiny``: ViT on 32×32 images (patch 4, width 64, 4 layers), text transformer
  of width 64, 2 layers, context 32, embed_dim 64: the demo model, pre-trains on 2 CPU cores.
* ``ffclip-vit-test``, ``ffclip-rn-test``: tiny ViT and ModifiedResNet for the tests.

No weights are ever downloaded; a foreign open_clip checkpoint is read from a file
(:func:`import_clip_checkpoint`). Tokenization uses open_clip's SimpleTokenizer, whose BPE
vocabulary ships inside the open_clip package.

:class:`ClipModel` wraps the open_clip model with the input normalization (callers feed
[0, 1] images) and is what a run loads; checkpoints hold the *open_clip* state dict, so a
run's ``ckpt-*.safetensors`` loads with ``open_clip.create_model(name, pretrained=PATH)``.

Scored layers (the θ of DESIGN.md §2) are Linear maps in the visual tower, named by path:

* ``visual.proj`` (ViT): an ``nn.Parameter`` of shape (width, embed_dim) applied as
  ``x @ proj``; scored as a Linear without bias whose weight is ``proj.T`` (embed_dim, width).
* ``visual.attnpool.c_proj`` (ModifiedResNet): the attention pool's output projection, an
  ``nn.Linear`` that open_clip applies inside ``F.multi_head_attention_forward``.
* any other ``nn.Linear`` module of the visual tower that is called as a module (e.g.
  ``visual.transformer.resblocks.3.mlp.c_fc``): its tokens are the "views" of the ghost
  algebra (the per-sample gradient sums over tokens).

The default is the visual tower's final projection: ``visual.proj`` or
``visual.attnpool.c_proj``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError

CLIP_CONFIG_DIR = Path(__file__).resolve().parent.parent / "assets" / "clip-configs"
OBJECTIVE = "clip_infonce"
MAX_LOGIT_SCALE = 100.0  # exp of open_clip's clamp, ln 100
PROJ_KINDS = ("vit_proj", "attnpool_c_proj", "linear")


def open_clip_module():
    """``open_clip``, imported lazily (it takes seconds), with this package's configs
    registered."""
    try:
        import open_clip
    except ImportError as e:
        raise ConfigError("the CLIP path needs open_clip: pip install open_clip_torch") from e
    if "ffclip-vit-tiny" not in open_clip.list_models():
        open_clip.add_model_config(CLIP_CONFIG_DIR)
    return open_clip


class _DropRandomInitNotice(logging.Filter):
    """open_clip logs a warning on every model created without weights; here that is the
    point (runs load their own), so the notice is dropped while creating."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_create() -> Iterator[None]:
    f = _DropRandomInitNotice()
    root = logging.getLogger()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def model_config(name: str) -> dict:
    """The open_clip config (``embed_dim``, ``vision_cfg``, ``text_cfg``...) of a name."""
    oc = open_clip_module()
    cfg = oc.get_model_config(name)
    if cfg is None:
        raise ConfigError(f"open_clip has no model config {name!r}; known: ffclip-vit-tiny, "
                          "ffclip-vit-test, ffclip-rn-test, RN50, ViT-B-32, ... "
                          "(open_clip.list_models()).")
    return cfg


class ClipModel(nn.Module):
    """An open_clip model that takes [0, 1] images: ``f(x) = clip.encode_image(norm(x))``.

    Attributes: ``clip`` (the open_clip model), ``name``, ``config`` (its open_clip config),
    ``image_size``, ``context_length``.
    """

    def __init__(self, clip: nn.Module, name: str, config: dict):
        super().__init__()
        oc = open_clip_module()
        self.clip = clip
        self.name = name
        self.config = config
        size = clip.visual.image_size
        self.image_size = int(size[0] if isinstance(size, tuple | list) else size)
        self.context_length = int(clip.context_length)
        mean = torch.tensor(oc.constants.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(oc.constants.OPENAI_DATASET_STD).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) [0, 1] images -> (N, embed_dim) unnormalized image embeddings."""
        return self.clip.encode_image(self.normalize(x))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, context_length) token ids -> (N, embed_dim) unnormalized text embeddings."""
        return self.clip.encode_text(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_image(x)

    def logit_scale(self) -> torch.Tensor:
        """``exp(logit_scale)`` clamped at 100, as in training (a constant for scoring)."""
        return self.clip.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, context_length) int64 token ids with open_clip's bundled BPE tokenizer."""
        return tokenizer_for(self.name, self.context_length)(list(texts))

    def model_entry(self) -> dict:
        """The run manifest's ``model`` entry: enough to rebuild this architecture."""
        return {"family": "open_clip", "name": self.name, "config": self.config}


@functools.lru_cache(maxsize=8)
def tokenizer_for(name: str, context_length: int):
    """open_clip's tokenizer of a model (built once: it reads the BPE vocabulary)."""
    oc = open_clip_module()
    return oc.get_tokenizer(name, context_length=context_length)


def create_clip(name: str = "ffclip-vit-tiny", config: dict | None = None,
                seed: int | None = None) -> ClipModel:
    """A randomly initialized open_clip model, offline (``pretrained=None``).

    ``config``: a full open_clip config overriding the registered one of ``name`` (how a
    run rebuilds the exact architecture it recorded). ``seed`` fixes the initialization
    without touching the global RNG.
    """
    oc = open_clip_module()
    cfg = model_config(name) if config is None else json.loads(json.dumps(config))
    kwargs = {k: v for k, v in cfg.items() if k not in ("custom_text",)}
    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet_create())
        if seed is not None:
            stack.enter_context(torch.random.fork_rng(devices=[]))
            torch.manual_seed(seed)
        try:
            clip = oc.create_model(name, pretrained=None, **kwargs)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ConfigError(f"open_clip cannot create model {name!r} with config {cfg}: "
                              f"{e}") from e
    return ClipModel(clip, name, cfg).eval()


def build_clip_from_entry(entry: dict) -> ClipModel:
    """Rebuild the model of a run manifest's ``model`` entry."""
    if entry.get("family") != "open_clip":
        raise ConfigError(f"model entry {entry!r} is not an open_clip model.")
    return create_clip(entry["name"], entry["config"])


# --------------------------------------------------------------------------- scored layers
@dataclass(frozen=True)
class ScoredLinear:
    """A Linear map ``y = W h + b`` of the visual tower, in Linear layout.

    kind: ``vit_proj`` (W = proj.T, no bias), ``attnpool_c_proj`` or ``linear``;
    weight: the real parameter (proj itself for ``vit_proj``); bias: or None.
    """

    name: str
    kind: str
    module: nn.Module | None
    weight: nn.Parameter
    bias: nn.Parameter | None

    @property
    def is_final_projection(self) -> bool:
        return self.kind in ("vit_proj", "attnpool_c_proj")

    def param_names(self) -> list[str]:
        return [f"{self.name}.weight"] + ([f"{self.name}.bias"] if self.bias is not None
                                          else [])

    def params(self) -> list[nn.Parameter]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def linear_weight(self) -> torch.Tensor:
        """W in Linear layout (d_out, d_in)."""
        return self.weight.T if self.kind == "vit_proj" else self.weight

    def to_linear_layout(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Gradients w.r.t. ``params()`` -> Linear layout (a ViT proj gradient transposes)."""
        out = list(grads)
        if self.kind == "vit_proj":
            out[0] = out[0].T
        return out


def default_scored_layers(model: ClipModel) -> tuple[str, ...]:
    """The visual tower's final projection."""
    v = model.visual
    if getattr(v, "proj", None) is not None and isinstance(v.proj, nn.Parameter):
        return ("visual.proj",)
    if hasattr(v, "attnpool") and isinstance(getattr(v.attnpool, "c_proj", None), nn.Linear):
        return ("visual.attnpool.c_proj",)
    raise ConfigError(f"the visual tower {type(v).__name__} has no final projection this "
                      "scorer knows (ViT visual.proj or ModifiedResNet visual.attnpool.c_proj);"
                      " name an nn.Linear of the visual tower explicitly.")


def _strip(name: str) -> str:
    """Layer names are relative to ClipModel.clip (``visual.proj``); ``clip.`` is allowed."""
    return name[len("clip."):] if name.startswith("clip.") else name


def linear_layout_grads(lins: Sequence[ScoredLinear], outputs: Sequence[torch.Tensor | None]
                        ) -> list[torch.Tensor]:
    """``torch.autograd.grad(..., [p for s in lins for p in s.params()], allow_unused=True)``
    -> every scored layer's gradient in Linear layout (unused parameters: zeros), in the
    order of their ``param_names()``."""
    params = [p for s in lins for p in s.params()]
    g = [torch.zeros_like(p) if t is None else t for t, p in zip(outputs, params, strict=True)]
    out, k = [], 0
    for s in lins:
        m = len(s.params())
        out += s.to_linear_layout(g[k: k + m])
        k += m
    return out


def scored_linears(model: ClipModel, names: Sequence[str] | None = None) -> list[ScoredLinear]:
    """Resolve scored-layer names (default: :func:`default_scored_layers`)."""
    names = default_scored_layers(model) if not names else names
    mods = dict(model.clip.named_modules())
    out = []
    for raw in names:
        name = _strip(raw)
        if name == "visual.proj":
            p = getattr(model.visual, "proj", None)
            if not isinstance(p, nn.Parameter):
                raise ConfigError("scored layer 'visual.proj' needs a ViT visual tower with a "
                                  f"projection; this one is {type(model.visual).__name__}.")
            out.append(ScoredLinear(name, "vit_proj", None, p, None))
            continue
        if not name.startswith("visual."):
            raise ConfigError(f"scored layer {raw!r} is not in the visual tower; the score "
                              "differentiates image-side parameters only (names start with "
                              "'visual.').")
        m = mods.get(name)
        if not isinstance(m, nn.Linear):
            linears = ["visual.proj"] * isinstance(getattr(model.visual, "proj", None),
                                                  nn.Parameter)
            linears += [n for n, mm in mods.items()
                        if n.startswith("visual.") and isinstance(mm, nn.Linear)]
            raise ConfigError(f"scored layer {raw!r} is not an nn.Linear of the visual tower "
                              f"(got {type(m).__name__ if m is not None else 'nothing'}); "
                              f"scorable: {linears[:12]}{' ...' if len(linears) > 12 else ''}.")
        kind = "attnpool_c_proj" if name.endswith("attnpool.c_proj") else "linear"
        if ".attnpool." in name and kind == "linear":
            raise ConfigError(f"{raw!r} is applied inside F.multi_head_attention_forward; of "
                              "the attention pool only c_proj can be scored.")
        out.append(ScoredLinear(name, kind, m, m.weight, m.bias))
    if len({s.name for s in out}) != len(out):
        raise ConfigError(f"scored layers {list(names)} name a layer twice.")
    return out


def _attnpool_with_input(pool: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's AttentionPool2d.forward, also returning the input rows of ``c_proj``.

    Runs the same ``F.multi_head_attention_forward`` call with an identity output
    projection (exact: multiplying by 1 and adding 0), then applies ``c_proj``.
    """
    x = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3]).permute(2, 0, 1)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
    x = x + pool.positional_embedding[:, None, :].to(x.dtype)
    d = x.shape[-1]
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    attn, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=d, num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight, in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=eye, out_proj_bias=torch.zeros(d, dtype=x.dtype, device=x.device),
        use_separate_proj_weight=True, training=pool.training, need_weights=False)
    h = attn[0]
    return h, pool.c_proj(h)


def visual_split(model: ClipModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, e)``: the input rows (N, d_in) of the visual tower's final projection and the
    image embeddings (N, embed_dim) it produces, for [0, 1] images (N, 3, S, S).

    Equals ``model.encode_image(x)`` in ``e`` (a test checks it); differentiable like it.
    """
    v = model.visual
    z = model.normalize(x)
    if isinstance(getattr(v, "proj", None), nn.Parameter):
        if getattr(v, "attn_pool", None) is not None or getattr(v, "output_tokens", False):
            raise ConfigError("ViT towers with attentional pooling or token outputs are not "
                              "supported by the final-projection fast path.")
        t = v.transformer(v._embeds(z))
        pooled, _ = v._pool(t)
        return pooled, pooled @ v.proj
    if hasattr(v, "attnpool") and hasattr(v, "stem"):
        t = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(z)))))
        return _attnpool_with_input(v.attnpool, t)
    raise ConfigError(f"visual tower {type(v).__name__} is neither an open_clip ViT nor a "
                      "ModifiedResNet.")


# --------------------------------------------------------------------------- checkpoints
def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A foreign checkpoint's state dict: safetensors, or a torch file read with
    ``weights_only=True`` (never unpickles code). Accepts ``{"state_dict": ...}`` wrappers
    and DataParallel's ``module.`` prefix, as open_clip does."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many types on bad files
        raise DataError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}); expected "
                        "an open_clip state dict (.pt/.pth/.bin via torch.save, or "
                        ".safetensors).") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise DataError(f"checkpoint {path} holds no state dict (got {type(state).__name__}).")
    if next(iter(state)).startswith("module."):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_into(model: ClipModel, state: dict[str, torch.Tensor], source: str) -> ClipModel:
    """Load an open_clip state dict (logit scale shape differences tolerated)."""
    own = model.clip.state_dict()
    state = dict(state)
    if "logit_scale" in state and "logit_scale" in own:
        state["logit_scale"] = state["logit_scale"].reshape(own["logit_scale"].shape)
    try:
        model.clip.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DataError(f"checkpoint {source} does not fit open_clip model {model.name!r}: "
                        f"{str(e)[:600]}") from e
    return model


def import_clip_checkpoint(path: str | Path, model_name: str, out_run_dir: str | Path,
                           index=None, lr: float = 1.0, epoch: int = 1,
                           scored_layers: Sequence[str] | None = None,
                           config: dict | None = None):
    """Make a run directory from a foreign open_clip checkpoint, so it can be scored.

    The run holds one checkpoint (``epoch``, learning rate ``lr``: the weight α of its
    score terms; unknown for a foreign model, so 1 by default, which scales every score
    alike). ``index``: the :class:`~ffengine.data.index.SampleIndex` the model was
    pre-trained on, whose hash scoring will check; without it the run records no index and
    scoring must be told ``check_index=False``. Returns the :class:`~ffengine.run.Run`.
    """
    from .. import __version__
    from ..io_utils import atomic_write_json
    from ..run import MANIFEST, RUN_FORMAT_VERSION, Run, save_checkpoint

    out = Path(out_run_dir)
    if (out / MANIFEST).exists():
        raise DataError(f"{out} already holds a run; import into a new directory.")
    model = create_clip(model_name, config)
    load_into(model, load_state_dict_file(path), str(path))
    layers = [s.name for s in scored_linears(model, scored_layers)]
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format_version": RUN_FORMAT_VERSION,
        "objective": {"name": OBJECTIVE, "max_logit_scale": MAX_LOGIT_SCALE},
        "model": model.model_entry(),
        "scored_layers": layers,
        "augment": None,
        "index": {"path": str(index.path) if index is not None else None,
                  "hash": index.hash if index is not None else None},
        "training": {"imported_from": str(Path(path).resolve())},
        "command": f"import_clip_checkpoint({str(path)!r}, {model_name!r})",
        "created_by": f"ffengine {__version__}",
        "checkpoints": [],
    }
    manifest = json.loads(json.dumps(manifest))
    atomic_write_json(out / MANIFEST, manifest)
    save_checkpoint(out, manifest, model.clip, None, epoch, 0, float(lr))
    return Run(out)


def load_clip_model(run, ckpt, device: torch.device | str = "cpu") -> ClipModel:
    """The model of run checkpoint ``ckpt`` (a :class:`~ffengine.run.Checkpoint`), eval mode."""
    from safetensors.torch import load_file

    if run.manifest.get("objective", {}).get("name") != OBJECTIVE:
        raise ConfigError(f"run {run.path} is not a CLIP run (objective "
                          f"{run.manifest.get('objective', {}).get('name')!r}).")
    model = build_clip_from_entry(run.manifest["model"])
    try:
        state = load_file(str(ckpt.weights))
    except Exception as e:
        raise DataError(f"cannot read checkpoint {ckpt.weights} ({e}).") from e
    load_into(model, state, str(ckpt.weights))
    return model.to(device).eval()


__all__ = ["CLIP_CONFIG_DIR", "ClipModel", "ScoredLinear", "build_clip_from_entry",
           "create_clip", "default_scored_layers", "import_clip_checkpoint", "load_clip_model",
           "linear_layout_grads", "load_into", "load_state_dict_file", "model_config",
           "scored_linears",
           "tokenizer_for", "visual_split"]
