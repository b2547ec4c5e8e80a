"""Build step for the optional compiled kernel (everything else is declared in pyproject.toml).

gittheta_merge/merge/_lincomb.c is a plain C shared library loaded with ctypes (merge/fused.py), built here as
an extension so `pip install` compiles it. `optional=True`: with no C compiler the install still succeeds and
average / task arithmetic run on the numpy path, with the same results, 1.3-1.7x slower (docs/merge.md).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gittheta_merge.merge._lincomb",
            sources=["gittheta_merge/merge/_lincomb.c"],
            # -ffp-contract=off: no fused multiply-add, so results equal the numpy and torch paths bit for bit
            extra_compile_args=["-O3", "-ffp-contract=off"],
            optional=True,
        )
    ]
)
