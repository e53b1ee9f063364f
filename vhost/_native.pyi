# Type stub for the cffi-built module (c_ext/build.py declares the real interface).
from typing import Any

ffi: Any
lib: Any
