"""Why an existing file cannot be used (pure): the refusal words shared by a disk's image, its
library base and the persistent root's overlay. None when the file can be used."""

from __future__ import annotations

import posixpath

from diskplan import keys as K
from hooksidecar.prepare.observe import FileState


def image_problem(image: FileState, where: str) -> str | None:
    """Why an existing file cannot be used as a qcow2 image diskhooks manages (None when it can)."""
    if image.kind == "symlink":
        return f"{where} is a symbolic link; diskhooks only uses regular files and never follows links"
    if image.kind == "not-regular":
        return f"{where} is not a regular file"
    if image.kind == "unreadable":
        return f"{where} cannot be read: {image.detail}"
    if image.kind == "raw" and image.file_size == 0:
        return (f"{where} is empty (0 bytes), not a qcow2 image; diskhooks never replaces a file it "
                "did not make: delete it on the node and restart the VM")
    if image.kind == "raw":
        return (f"{where} is not a qcow2 image (raw file? KubeVirt creates raw files when prepare did not "
                "run); diskhooks never converts or touches images of another format: if it holds no "
                "data, delete it on the node and restart the VM")
    if image.kind == "bad-qcow2":
        return f"{where} is not a usable qcow2 image: {image.detail}"
    if image.data_file is not None:
        return (f"{where} has an external data file {image.data_file!r}; diskhooks refuses qcow2 images "
                "whose data lives in another file")
    if image.encrypted:
        return f"{where} is encrypted; diskhooks images are not"
    if image.unknown_features:
        return f"{where} uses qcow2 features qemu does not know (0x{image.unknown_features:x})"
    if image.corrupt:
        return f"{where} is marked corrupt by qemu; check it with qemu-img check -f qcow2 on the node"
    return None


def backing_problem(image: FileState, where: str, expected: str | None,
                    expected_format: str | None) -> str | None:
    if image.backing_file == expected and (expected is None or image.backing_format == expected_format):
        return None
    if image.backing_file is None:
        return (f"{where} has no backing file, but the plan expects {expected!r} ({expected_format}); "
                "diskhooks does not rebase images")
    outside = "" if _in_allowed_dirs(image.backing_file) else \
        " (outside the VM directory and the image library)"
    want = "none" if expected is None else f"{expected!r} ({expected_format})"
    return (f"{where} has backing file {image.backing_file!r} ({image.backing_format}){outside}; the plan "
            f"expects {want}; diskhooks refuses images with unexpected backing files")


def _in_allowed_dirs(name: str) -> bool:
    """Whether a backing file name read from a header lies in the VM directory or the image library
    once ``..`` is resolved (for the message only: any unexpected backing file is refused)."""
    clean = posixpath.normpath(name)
    return name.startswith("/") and clean.startswith((K.LAUNCHER_VM_DIR + "/",
                                                      K.LAUNCHER_IMAGE_LIBRARY + "/"))
