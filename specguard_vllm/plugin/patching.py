"""How SpecGuard patches a vLLM class: a patch class whose methods replace the target's.

The shape of ArcticInference's ``ArcticPatch``: a subclass of :class:`VllmPatch` names its
``target`` as ``"module:Class"`` (imported only when the patch is applied) and defines the
overriding methods in its body. :meth:`VllmPatch.apply` copies each of them onto the target,
first keeping the target's own definition reachable as ``_orig_<name>``, and records the
patch's name on the target class itself, so applying twice changes nothing.

An override calls the original as ``self._orig_<name>(...)`` (for a staticmethod,
``<Patch>.original("<name>")(...)``). It must not use zero-argument ``super()``: copied onto
another class, that would still refer to the patch class.
"""

from __future__ import annotations

import importlib
import inspect
from types import FunctionType
from typing import Any, ClassVar

APPLIED_PATCHES = "_specguard_patches"  # on each target class: names of the patches applied
_METHOD_TYPES = (FunctionType, staticmethod, classmethod, property)


class VllmPatch:
    """Base of every SpecGuard patch; see the module docstring."""

    target: ClassVar[str]  # "package.module:ClassName"
    optional: ClassVar[bool] = False  # skip, rather than fail, when the target cannot be imported

    @classmethod
    def target_class(cls) -> type:
        module_name, _, class_name = cls.target.partition(":")
        return getattr(importlib.import_module(module_name), class_name)

    @classmethod
    def overrides(cls) -> dict[str, Any]:
        """The methods this patch puts on its target: those of its body and of any patch
        class it derives from (so one body can serve several targets)."""
        methods: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            if issubclass(klass, VllmPatch) and klass is not VllmPatch:
                methods.update((name, value) for name, value in vars(klass).items()
                               if isinstance(value, _METHOD_TYPES))
        return methods

    @classmethod
    def apply(cls) -> None:
        try:
            target = cls.target_class()
        except Exception:  # e.g. a GPU backend whose kernels are not installed here
            if cls.optional:
                return
            raise
        applied = vars(target).get(APPLIED_PATCHES, ())
        if cls.__name__ in applied:
            return
        for name, method in cls.overrides().items():
            try:
                original = inspect.getattr_static(target, name)
            except AttributeError:
                original = None  # a method the patch adds
            if original is not None:
                setattr(target, f"_orig_{name}", original)
            setattr(target, name, method)
        setattr(target, APPLIED_PATCHES, (*applied, cls.__name__))

    @classmethod
    def original(cls, name: str):
        """The target's own ``name``, as it was before this patch (for staticmethods)."""
        return getattr(cls.target_class(), f"_orig_{name}")
