"""The ``dali-patches`` command line: arguments (:mod:`.main`), what each command does (:mod:`.commands`)."""

from .main import main

__all__ = ["main"]
