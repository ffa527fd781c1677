"""nectar: compile a long document into small neural modules that stand in for its KV cache."""
from .artifact import Artifact
from .attach import attach, positions_after
from .compiler import compile
from .config import CompileConfig, FitConfig, PromptConfig
from .errors import NectarError
from .generate import ask, ask_full
from .models import load_model

__all__ = ["Artifact", "CompileConfig", "FitConfig", "NectarError", "PromptConfig", "ask", "ask_full", "attach",
           "compile", "load_model", "positions_after"]
