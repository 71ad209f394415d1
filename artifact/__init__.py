"""The artifact directory: its manifest (a validated document, the trust boundary) and loading it into a
`btp.runtime.Pipeline` over one backend engine per graph."""

from .manifest import MANIFEST, Manifest, read_manifest

__all__ = ["MANIFEST", "Manifest", "read_manifest"]
