"""splitfed: train PyTorch models across parties that never share raw data."""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # splitfed.run, imported when first used: `import splitfed` stays light for the CLI and the torch-free roles.
    if name == "run":
        from splitfed.api import run

        return run
    raise AttributeError(f"module 'splitfed' has no attribute {name!r}")
