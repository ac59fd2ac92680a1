"""Exception hierarchy: every error refusal-lens raises on bad input names the fix."""


class RefusalLensError(Exception):
    """Base class for refusal-lens errors; the CLI prints these without a traceback.

    Example:
        >>> try:
        ...     load_model("no/such/folder")
        ... except RefusalLensError as e:
        ...     print(e)                          # one line that names the fix
    """


class ModelLoadError(RefusalLensError):
    """A model could not be found, verified, or booted into TransformerLens."""


class ChatTemplateError(RefusalLensError):
    """The tokenizer has no usable chat template, or the template is malformed."""


class DataError(RefusalLensError):
    """A prompt set is empty, duplicated, too small, or unreadable."""


class DirectionError(RefusalLensError):
    """A direction is NaN, zero, the wrong width, or belongs to another model."""


class OutputExistsError(RefusalLensError):
    """An output path exists and --overwrite was not given."""


class ExportError(RefusalLensError):
    """A model could not be exported or verified after export."""


class CacheError(RefusalLensError):
    """The model cache directory is unwritable or its contents cannot be used."""


class OutputWriteError(RefusalLensError):
    """An output location is not writable (read-only, not a folder) or its disk is too full."""
