"""Exception types raised by ccflow for bad input."""


class CcflowError(Exception):
    """Base class of the errors ccflow raises for invalid input or configuration."""


class ImageReadError(CcflowError):
    """An image file cannot be decoded or has a layout ccflow does not support."""


class DatasetError(CcflowError):
    """A dataset folder is missing, empty, or contains images and masks that do not match."""
