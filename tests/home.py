"""Home implementations of MViTv2 checkpoints, when installed, as test oracles.

torchvision's `mvit_v2_s` is pure PyTorch, but torchvision's package import
registers fake kernels for its compiled ops, which fails when its C++ extension
does not match the installed torch (e.g. the CPU torch wheel). The model code
needs none of those ops, so that one registration module is skipped.
"""

from __future__ import annotations

import importlib
import sys
import types


def torchvision_mvit_v2_s():
    """torchvision.models.video.mvit_v2_s, or None when torchvision is not installed."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        from torchvision.models.video import mvit_v2_s
    except RuntimeError:  # compiled ops unavailable: skip their fake-kernel registrations
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        from torchvision.models.video import mvit_v2_s
    return mvit_v2_s


def mmaction2_mvit():
    """mmaction2's (MViT, MViTHead) classes, or None when mmaction2 is not installed.

    mmaction2 1.2.0's `mmaction.models` package import needs `localizers.drn`, which its
    wheel lacks. The backbone, head and loss modules need none of it, so the packages
    above them are entered as bare namespaces (their __init__ not run) and the losses
    package is imported for the head's registry lookup of CrossEntropyLoss.
    """
    if importlib.util.find_spec("mmaction") is None:
        return None
    import mmaction

    root = mmaction.__path__[0]
    for name in ("models", "models.backbones", "models.heads"):
        if f"mmaction.{name}" not in sys.modules:
            package = types.ModuleType(f"mmaction.{name}")
            package.__path__ = [f"{root}/{name.replace('.', '/')}"]
            sys.modules[f"mmaction.{name}"] = package
    importlib.import_module("mmaction.models.losses")
    from mmaction.models.backbones.mvit import MViT
    from mmaction.models.heads.mvit_head import MViTHead
    return MViT, MViTHead
