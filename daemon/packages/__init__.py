"""``.difypkg`` packages: reading them safely, building them, keeping them by identifier."""

from daemon.packages.archive import Limits, PackageError
from daemon.packages.build import build
from daemon.packages.decode import Decoded, PackageStore, decode_into

__all__ = ["Decoded", "Limits", "PackageError", "PackageStore", "build", "decode_into"]
