"""The one native part: incfs._block_dirents (src/incfs/_block_dirents.c),
a fast path for directory listings. Optional: if it cannot be built (no
compiler, no Python headers) the install goes on and incfs.block_dirents
does the same in Python. Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("incfs._block_dirents", ["src/incfs/_block_dirents.c"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra"], optional=True)])
