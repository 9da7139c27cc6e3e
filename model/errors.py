"""Typed errors for everything that can go wrong between bytes and a face.

The CLI and the API map each one to a message and a status code through ``code`` and ``status``, so a bad
upload is always a clear 4xx and never a crash.
"""

from __future__ import annotations

from collections.abc import Callable


class VisageError(Exception):
    """Base class: ``code`` is a stable machine-readable name, ``status`` the HTTP status it maps to."""

    code = "visage_error"
    status = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def prefixed(self, where: str) -> VisageError:
        """This error with ``where:`` before its detail (which of several inputs failed), ready to re-raise."""
        self.detail = f"{where}: {self.detail}"
        self.args = (self.detail,)
        return self


class EmptyImage(VisageError):
    code = "empty_image"


class UnreadableImage(VisageError):
    """Corrupt, truncated, or not an image at all."""

    code = "unreadable_image"


class UnsupportedImageType(VisageError):
    code = "unsupported_image_type"
    status = 415


class ImageTooLarge(VisageError):
    """Too many bytes or too many pixels (decompression bombs land here before any allocation)."""

    code = "image_too_large"
    status = 413


class NoFaceFound(VisageError):
    code = "no_face_found"
    status = 422


class MultipleFaces(VisageError):
    """Several faces where one was required and the caller did not say which."""

    code = "multiple_faces"
    status = 422


class InvalidConfig(VisageError):
    """A model configuration the network cannot be built from (alpha, input size, unknown backbone)."""

    code = "invalid_config"


class WeightsError(VisageError):
    """A weights bundle that is missing, corrupt or of an unknown format."""

    code = "weights_error"
    status = 500


def validation_problems(errors: list[dict], name: Callable[[tuple], str]) -> str:
    """pydantic's ``ValidationError.errors()`` as one line, ``NAME='value': what it should be; ...``: its own
    message takes three lines a field with a web link, and names fields as code does, not as users typed them."""
    return "; ".join(f"{name(tuple(e['loc']))}={e['input']!r}: {e['msg']}" for e in errors)
