"""Which attention (the mathematics) and how it runs (the implementation), as one table.

The attentions are ``inline``, ``linear`` and ``softmax`` (:mod:`mmlinattn.ops.inline`),
and the siblings from the same group: ``focused`` (FLatten, :mod:`.focused`),
``agent`` (:mod:`.agent`) and ``mlla`` (:mod:`.mlla`). An implementation computes
one of them: ``torch``
(the functions of :mod:`mmlinattn.ops.inline`) today, a fused ``triton`` or a
``compiled`` one later. A new implementation is one module with a function of
the same signature plus one :func:`register_attention_impl` call; it is chosen
with ``impl='name'``, or by ``impl='auto'`` (the default) when it has the
highest priority among the entries that support the call's inputs.

Every implementation takes ``q, k, v`` of shape ``(batch, heads, tokens, head_dim)``
and ``mask`` ``(batch, tokens)`` bool or None, ``kernel`` and ``scale``, plus the
attention's own keyword options (``agents=`` of agent attention, ``rotations=`` of
MLLA, ...), and returns ``(batch, heads, tokens, head_dim)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor

from .agent import agent_attention
from .focused import focused_linear_attention
from .inline import KernelArg, inline_attention, linear_attention, softmax_attention
from .mlla import mlla_linear_attention

__all__ = ['AttentionImpl', 'ATTENTION_IMPLS', 'register_attention_impl', 'get_attention_impl',
           'attention', 'resolve_kernel', 'SUMMED_ATTENTIONS', 'ATTENTIONS', 'QKV_ATTENTIONS',
           'ATTENTION_FUNCTIONS']


def _any_input(q: Tensor) -> bool:
    return True


@dataclass(frozen=True)
class AttentionImpl:
    """One implementation of one attention."""

    #: The mathematics: ``inline``, ``linear`` or ``softmax``.
    attention: str
    #: How it runs: ``torch``, ``triton``, ``compiled``, ...
    impl: str
    fn: Callable[..., Tensor]
    #: ``phi`` when the caller passes ``kernel='default'``; the same for every
    #: implementation of one attention (it is part of the mathematics).
    default_kernel: KernelArg
    #: ``impl='auto'`` takes the highest-priority entry whose ``supports(q)`` holds.
    priority: int = 0
    #: Whether this implementation handles inputs like ``q`` (device, dtype, shape).
    supports: Callable[[Tensor], bool] = _any_input
    #: Keyword options every call must pass (``('agents', )`` for agent attention).
    required: tuple[str, ...] = ()


#: attention -> implementation name -> entry.
ATTENTION_IMPLS: dict[str, dict[str, AttentionImpl]] = {}


def register_attention_impl(entry: AttentionImpl, replace: bool = False) -> AttentionImpl:
    """Add ``entry`` to :data:`ATTENTION_IMPLS` (``replace`` an existing one of that name)."""
    if entry.impl == 'auto':
        raise ValueError("'auto' chooses an implementation; it cannot name one")
    impls = ATTENTION_IMPLS.setdefault(entry.attention, {})
    if entry.impl in impls and not replace:
        raise ValueError(f'{entry.attention} attention already has a {entry.impl!r} '
                         'implementation; pass replace=True to replace it')
    others = [e for e in impls.values() if e.impl != entry.impl]
    if others and others[0].default_kernel != entry.default_kernel:
        raise ValueError(f'{entry.impl!r}: default kernel {entry.default_kernel!r} differs from '
                         f'{others[0].impl!r} ({others[0].default_kernel!r}) for the same '
                         f'{entry.attention} attention')
    impls[entry.impl] = entry
    return entry


def _attention_table(name: str) -> dict[str, AttentionImpl]:
    if name not in ATTENTION_IMPLS:
        raise ValueError(f'unknown attention {name!r}; expected one of {sorted(ATTENTION_IMPLS)}')
    return ATTENTION_IMPLS[name]


def get_attention_impl(name: str, impl: str = 'auto', q: Optional[Tensor] = None
                       ) -> AttentionImpl:
    """The entry for attention ``name``: ``impl`` by name, or with ``'auto'`` the
    highest-priority one supporting ``q`` (any, when ``q`` is None)."""
    table = _attention_table(name)
    if impl != 'auto':
        if impl not in table:
            raise ValueError(f'{name} attention has no {impl!r} implementation; expected '
                             f"'auto' or one of {sorted(table)}")
        entry = table[impl]
        if q is not None and not entry.supports(q):
            raise ValueError(f'the {impl!r} implementation of {name} attention does not support '
                             f'{q.dtype} inputs of shape {tuple(q.shape)} on {q.device}')
        return entry
    usable = [e for e in table.values() if q is None or e.supports(q)]
    if not usable:
        raise ValueError(f'no implementation of {name} attention supports {q.dtype} inputs '
                         f'on {q.device}')
    return max(usable, key=lambda e: e.priority)


def resolve_kernel(name: str, kernel: KernelArg = 'default') -> KernelArg:
    """``kernel``, or the attention's default kernel for ``'default'``."""
    if isinstance(kernel, str) and kernel == 'default':
        return next(iter(_attention_table(name).values())).default_kernel
    return kernel


def attention(name: str, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None,
              kernel: KernelArg = 'default', scale: Optional[float] = None,
              impl: str = 'auto', reduce: Optional[Callable[[Tensor], Tensor]] = None,
              **options) -> Tensor:
    """Attention ``name`` (:data:`ATTENTIONS`) of ``q, k, v`` ``(B, heads, N, d)`` ->
    ``(B, heads, N, d)`` by implementation ``impl``.

    ``reduce``: the tokens are spread over processes and this sums a tensor over them
    (spatial parallelism); only attentions whose global state is a sum take it.
    ``options``: the attention's own keyword arguments (see its function).
    """
    entry = get_attention_impl(name, impl, q)
    missing = [o for o in entry.required if options.get(o) is None]
    if missing:
        raise ValueError(f'{name} attention needs {", ".join(f"{o}=" for o in missing)} '
                         f'(see {entry.fn.__module__}.{entry.fn.__name__})')
    extra = dict(options)
    if reduce is not None:
        if name not in SUMMED_ATTENTIONS:
            raise ValueError(f'{name} attention cannot be split over processes by summing '
                             f'statistics; only {sorted(SUMMED_ATTENTIONS)} can')
        extra['reduce'] = reduce
    return entry.fn(q, k, v, mask=mask, kernel=resolve_kernel(name, kernel), scale=scale,
                    **extra)


#: Attentions whose global state is a sum over tokens (what spatial parallelism reduces).
SUMMED_ATTENTIONS = frozenset({'inline', 'linear', 'focused', 'mlla'})


for _entry in (AttentionImpl('inline', 'torch', inline_attention, 'identity'),
               AttentionImpl('linear', 'torch', linear_attention, 'relu'),
               AttentionImpl('softmax', 'torch', softmax_attention, None),
               AttentionImpl('focused', 'torch', focused_linear_attention, None),
               AttentionImpl('agent', 'torch', agent_attention, None, required=('agents', )),
               AttentionImpl('mlla', 'torch', mlla_linear_attention, 'elu1')):
    register_attention_impl(_entry)

#: The attentions (mathematics) there are.
ATTENTIONS = tuple(ATTENTION_IMPLS)

#: Attentions defined by q, k and v alone (no learned or positional operand of their
#: own): a module can swap one for another with the same parameters (ablations).
QKV_ATTENTIONS = ('inline', 'linear', 'softmax')

#: The ``torch`` implementation of each attention (an older view of the table).
ATTENTION_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    name: impls['torch'].fn for name, impls in ATTENTION_IMPLS.items()}
