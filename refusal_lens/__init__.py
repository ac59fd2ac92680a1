from refusal_lens.errors import RefusalLensError
from refusal_lens.models import load_model

__all__ = ["RefusalLensError", "load_model"]
__version__ = "0.1.0"
