"""A pickle reader that rebuilds tensors and plain containers, and runs nothing else.

The reader is Python's own pure-Python unpickler with every opcode that could
reach code narrowed:

* a global name (``GLOBAL``, ``STACK_GLOBAL``, ``INST``, ``EXT*``) resolves only
  through fixed tables built at import time (tensor rebuilds, containers, torch
  dtypes and storage types); nothing is imported and no attribute is looked up
  by a name read from the file. Every other name becomes an inert
  :class:`UntrustedObject` type;
* calls (``REDUCE``, ``INST``, ``OBJ``, ``NEWOBJ``) reach only those resolved
  objects, and the tensor rebuilds are our own functions, which check that a
  tensor lies inside its storage;
* ``BUILD``, ``SETITEM(S)``, ``APPEND(S)``, ``ADDITEMS`` act only on stand-ins and
  plain containers (never on a tensor or another object's ``__setstate__``);
* buffers are bounded by the input (``BYTEARRAY8`` cannot ask for more bytes than
  the stream holds).

Storages come from a ``persistent_load`` callback given by the file-format reader.
"""
from __future__ import annotations

import _compat_pickle
import io
import math
import pickle
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

__all__ = ['UntrustedObject', 'StorageType', 'StorageRef', 'RestrictedUnpickler', 'TORCH_DTYPES']


class UntrustedObject:
    """Inert stand-in for a pickled object of a type we do not trust.

    Holds what the pickle would have passed to the real type (``args``,
    ``kwargs``, ``state``, ``items``) as plain data; no code of the original
    type runs, and nothing is imported to find it.
    """

    qualname = 'unknown'

    def __new__(cls, *args: Any, **kwargs: Any) -> UntrustedObject:
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items = args, kwargs, None, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # state set in __new__
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        self.items.append(value)

    def extend(self, values: Any) -> None:
        self.items.extend(values)

    def add(self, value: Any) -> None:
        self.items.append(value)

    def __repr__(self) -> str:
        return f'<untrusted {self.qualname}>'


def _stand_in(qualname: str) -> type:
    return type(f'Untrusted[{qualname}]', (UntrustedObject, ), {'qualname': qualname})


# -- names the reader knows, fixed at import ------------------------------------------------
#: torch's dtypes by attribute name (``float32``, ``half``, ...), read off the module once.
TORCH_DTYPES: dict[str, torch.dtype] = {
    name: obj
    for name, obj in vars(torch).items() if isinstance(obj, torch.dtype)
}


@dataclass(frozen=True)
class StorageType:
    """What a pickled ``torch.FloatStorage`` (etc.) stands for: the element dtype."""

    name: str
    dtype: torch.dtype


def _storage_types() -> dict[str, StorageType]:
    table = {'UntypedStorage': StorageType('UntypedStorage', torch.uint8)}
    for dtype, name in torch.storage._dtype_to_storage_type_map().items():
        if name.startswith(('QInt', 'QUInt')):
            continue  # quantized storages: not plain element views
        table[name] = StorageType(name, dtype)
    return table


STORAGE_TYPES: dict[str, StorageType] = _storage_types()


@dataclass(frozen=True)
class StorageRef:
    """A storage read from the file: its raw bytes (``uint8``, 1-D) and declared dtype."""

    data: Tensor
    dtype: torch.dtype

    def as_dtype(self, dtype: torch.dtype) -> Tensor:
        """The bytes as a 1-D tensor of ``dtype`` (shares memory)."""
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f'tensor dtype {dtype!r} is not a torch dtype')
        size = dtype.itemsize
        if self.data.numel() % size:
            raise pickle.UnpicklingError(f'a storage of {self.data.numel()} bytes does not hold '
                                         f'whole {dtype} elements')
        return self.data.view(dtype)


# -- tensor rebuilds (ours, replacing torch._utils') ---------------------------------------
_MAX_DIMS = 64


def _ints(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list, torch.Size)) or len(values) > _MAX_DIMS or \
            not all(type(v) is int and v >= 0 for v in values):
        raise pickle.UnpicklingError(f'tensor {what} {values!r} is not a tuple of '
                                     'non-negative ints')
    return tuple(values)


def _tensor_from_storage(storage: Any, offset: Any, size: Any, stride: Any,
                         dtype: Optional[torch.dtype] = None) -> Tensor:
    """A view of ``storage``, checked to lie inside it and not to outgrow it."""
    if not isinstance(storage, StorageRef):
        raise pickle.UnpicklingError('a tensor refers to no storage of this file')
    size, stride = _ints(size, 'size'), _ints(stride, 'stride')
    if len(size) != len(stride) or type(offset) is not int or offset < 0:
        raise pickle.UnpicklingError(f'tensor size {size}, stride {stride}, offset {offset!r} '
                                     'do not describe a tensor')
    flat = storage.as_dtype(dtype if dtype is not None else storage.dtype)
    numel = math.prod(size)
    if numel:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= flat.numel():
            raise pickle.UnpicklingError(
                f'tensor of size {size} (stride {stride}, offset {offset}) reaches element '
                f'{last} of a storage of {flat.numel()}')
        # A zero stride can make a few bytes "hold" a huge tensor that a later
        # .contiguous() would allocate; checkpoints never need that.
        if numel > flat.numel():
            raise pickle.UnpicklingError(
                f'tensor of size {size} has more elements ({numel}) than its storage '
                f'({flat.numel()}); overlapping views are not accepted')
    return flat.as_strided(size, stride, offset)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> Tensor:
    return _tensor_from_storage(storage, offset, size, stride)


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any,
                       requires_grad: Any = False, backward_hooks: Any = None,
                       metadata: Any = None) -> Tensor:
    # requires_grad, hooks and metadata are not restored: a loaded tensor is plain data.
    return _tensor_from_storage(storage, offset, size, stride)


def _rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, dtype: Any, metadata: Any = None) -> Tensor:
    return _tensor_from_storage(storage, offset, size, stride, dtype)


def _tensor_or_stand_in(data: Any, what: str) -> Any:
    if isinstance(data, (Tensor, UntrustedObject)):
        return data
    raise pickle.UnpicklingError(f'{what} wraps {type(data).__name__}, not a tensor')


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> Any:
    """An ``nn.Parameter`` loads as its tensor."""
    return _tensor_or_stand_in(data, 'a parameter')


def _rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any,
                                  state: Any) -> Any:
    """An ``nn.Parameter`` with attributes loads as its tensor (the attributes are dropped)."""
    return _tensor_or_stand_in(data, 'a parameter')


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """A tensor subclass loads as a plain tensor rebuilt by one of our functions."""
    if isinstance(func, type) and issubclass(func, UntrustedObject):
        return func(*args)
    if func not in _TENSOR_REBUILDS or not isinstance(args, tuple):
        raise pickle.UnpicklingError(f'tensor subclass rebuilt by {func!r}')
    return _tensor_or_stand_in(func(*args), 'a tensor subclass')


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    return _rebuild_from_type_v2(func, new_type, args, state)


_TENSOR_REBUILDS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter,
                    _rebuild_parameter_with_state)


def _codecs_encode(text: Any, encoding: str = 'utf-8') -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (latin-1 text only)."""
    if type(text) is not str or encoding not in ('latin1', 'latin-1'):
        raise pickle.UnpicklingError('_codecs.encode is honoured only for latin-1 text')
    return text.encode('latin1')


#: (module, name) -> what the reader returns for it. Identity matters: only these
#: objects (and stand-in types) may be called by REDUCE, INST, OBJ and NEWOBJ.
BASE_GLOBALS: dict[tuple[str, str], Any] = {
    ('collections', 'OrderedDict'): OrderedDict,
    ('torch', 'Size'): torch.Size,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'tuple'): tuple,
    ('builtins', 'list'): list,
    ('builtins', 'dict'): dict,
    ('builtins', 'complex'): complex,
    ('_codecs', 'encode'): _codecs_encode,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_tensor_v3'): _rebuild_tensor_v3,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter_with_state,
    ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
    ('torch._tensor', '_rebuild_from_type'): _rebuild_from_type,
    # torch < 1.9 wrote torch.tensor where it now writes torch._tensor.
    ('torch.tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
    ('torch.tensor', '_rebuild_from_type'): _rebuild_from_type,
}

class RestrictedUnpickler(pickle._Unpickler):  # the pure-Python one: each opcode is ours to narrow
    """Unpickle with :data:`BASE_GLOBALS` (plus ``extra_globals``) and stand-ins for the rest.

    Args:
        file: the pickle stream.
        persistent_load: resolves ``('storage', ...)`` ids to :class:`StorageRef`;
            None refuses persistent ids.
        extra_globals: more trusted ``(module, name) -> object`` entries.
        build_types: classes whose own ``__setstate__`` may run on ``BUILD``, each with
            a check of the state to run first (or None).
        max_bytes: upper bound on any single buffer the stream may request.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self,
                 file: io.IOBase,
                 persistent_load: Optional[Callable[[Any], Any]] = None,
                 extra_globals: Optional[Mapping[tuple[str, str], Any]] = None,
                 build_types: Optional[Mapping[type, Optional[Callable[[Any], None]]]] = None,
                 max_bytes: int = 0) -> None:
        super().__init__(file, encoding='utf-8')
        self._persistent = persistent_load
        self._globals = {**BASE_GLOBALS, **(extra_globals or {})}
        self._callables = {id(v) for v in self._globals.values()}
        self._build_types = dict(build_types or {})
        self._max_bytes = max_bytes
        self._stand_ins: dict[str, type] = {}
        self.refused: set[str] = set()

    # -- names ----------------------------------------------------------------------------
    def find_class(self, module: str, name: str) -> Any:
        if type(module) is not str or type(name) is not str:
            raise pickle.UnpicklingError('global names must be strings')
        if self.proto < 3:  # Python 2 names (protocol 2 writes __builtin__), a fixed table
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = self._globals.get((module, name))
        if found is not None:
            return found
        if module == 'torch' and name in TORCH_DTYPES:
            return TORCH_DTYPES[name]
        if module in ('torch', 'torch.storage') and name in STORAGE_TYPES:
            return STORAGE_TYPES[name]
        qualname = f'{module}.{name}'
        self.refused.add(qualname)
        if qualname not in self._stand_ins:
            self._stand_ins[qualname] = _stand_in(qualname)
        return self._stand_ins[qualname]

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise pickle.UnpicklingError('persistent id outside a torch checkpoint')
        return self._persistent(pid)

    # -- calls ----------------------------------------------------------------------------
    def _check_callable(self, func: Any, opcode: str) -> None:
        if (id(func) in self._callables and callable(func)) or (
                isinstance(func, type) and issubclass(func, UntrustedObject)):
            return
        raise pickle.UnpicklingError(f'{opcode} on {type(func).__name__} {func!r:.60}: only '
                                     'rebuild functions and containers may be called')

    def load_reduce(self) -> None:
        self._check_callable(self.stack[-2], 'REDUCE')
        super().load_reduce()

    dispatch[pickle.REDUCE[0]] = load_reduce

    def _instantiate(self, klass: Any, args: list) -> None:
        self._check_callable(klass, 'INST/OBJ')
        super()._instantiate(klass, args)

    def load_newobj(self) -> None:
        self._check_callable(self.stack[-2], 'NEWOBJ')
        super().load_newobj()

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        self._check_callable(self.stack[-3], 'NEWOBJ_EX')
        super().load_newobj_ex()

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    # -- mutation of objects already built ------------------------------------------------
    def _check_target(self, obj: Any, kinds: tuple[type, ...], opcode: str) -> None:
        if not isinstance(obj, kinds + (UntrustedObject, )):
            raise pickle.UnpicklingError(f'{opcode} on a {type(obj).__name__}')

    def load_build(self) -> None:
        state, inst = self.stack[-1], self.stack[-2]
        if type(inst) in self._build_types:
            check = self._build_types[type(inst)]
            if check is not None:
                check(state)
            super().load_build()
            return
        if isinstance(inst, UntrustedObject):
            super().load_build()
            return
        # Plain attributes on a container (``state_dict()._metadata``), or on a trusted
        # class without its own __setstate__: set directly, nothing of the type runs.
        trusted_plain = hasattr(inst, '__dict__') and (isinstance(inst, OrderedDict) or (
            id(type(inst)) in self._callables and '__setstate__' not in vars(type(inst))))
        if trusted_plain and isinstance(state, dict) and all(type(k) is str for k in state):
            self.stack.pop()
            vars(inst).update(state)
            return
        raise pickle.UnpicklingError(f'BUILD on a {type(inst).__name__}')

    dispatch[pickle.BUILD[0]] = load_build

    def _below_mark(self) -> Any:
        """The object under the topmost MARK: the target of SETITEMS, APPENDS, ADDITEMS."""
        return self.metastack[-1][-1] if self.metastack and self.metastack[-1] else None

    def load_setitem(self) -> None:
        self._check_target(self.stack[-3], (dict, ), 'SETITEM')
        super().load_setitem()

    def load_setitems(self) -> None:
        self._check_target(self._below_mark(), (dict, ), 'SETITEMS')
        super().load_setitems()

    def load_append(self) -> None:
        self._check_target(self.stack[-2], (list, ), 'APPEND')
        super().load_append()

    def load_appends(self) -> None:
        self._check_target(self._below_mark(), (list, ), 'APPENDS')
        super().load_appends()

    def load_additems(self) -> None:
        self._check_target(self._below_mark(), (set, ), 'ADDITEMS')
        super().load_additems()

    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.ADDITEMS[0]] = load_additems

    # -- buffers --------------------------------------------------------------------------
    def load_bytearray8(self) -> None:
        size, = struct.unpack('<Q', self.read(8))
        if size > self._max_bytes:
            raise pickle.UnpicklingError(f'a buffer of {size} bytes in a stream of at most '
                                         f'{self._max_bytes}')
        self.stack.append(bytearray(self.read(size)))

    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8
