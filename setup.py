"""
The native echo lane (echotw/transport/_lane.c) is built where it can be: it is
optional, so that installing succeeds without a C compiler or off Linux,
and echotw then serves every connection with its Python path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "echotw.transport._lane",
            ["echotw/transport/_lane.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
        )
    ]
)
