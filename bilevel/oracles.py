"""First- and second-order oracles of a bilevel problem, with call counting.

    grad_upper(x, y)      = (grad_x f, grad_y f)      grad_upper_x, grad_upper_y: one of the two
    grad_lower(x, y)      = (grad_x g, grad_y g)      grad_lower_x, grad_lower_y: one of the two
    hvp(x, y, v)          = d2_yy g . v                  (Hessian-vector product)
    cross(x, y, v)        = d2_xy g . v = d/dx <grad_y g, v>   (a tree shaped like x)

Every derivative is a return value of ``torch.autograd.grad`` on an explicit loss or of a
``torch.func`` transform; nothing is read from ``.grad`` buffers. Inputs are detached first, so
the oracles never extend a caller's graph (unrolled differentiation lives in ``hypergrad.itd``).

Second-order products have two modes:

* ``"reverse"`` (default): reverse-over-reverse (double backward). Fastest on CPU
  (about 2 gradients per HVP for linear and MLP models: ``python bench/oracles.py``, bench/README.md).
* ``"forward"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad``. Some CPU kernels
  have no forward-mode rule (oneDNN LSTM); the oracle then retries with oneDNN disabled and, if
  that fails too, falls back to reverse mode with a one-time warning.

A mode of ``None`` (the default of every product here and of the estimators'
``hvp_mode`` field) means the run's mode: the innermost :func:`second_order_mode` block, which
:func:`bilevel.solve` opens with its ``hvp_mode`` option, or "reverse" outside any.

Calls are counted in every active :func:`count_calls` context, so solvers need no bookkeeping.

Every second-order product is taken inside :func:`second_order`, which selects kernels that
can be differentiated twice: the math implementation of ``scaled_dot_product_attention`` (the
fused flash / memory-efficient kernels, on CUDA and on CPU, have no double backward and no
forward-mode rule), and, for problems holding a recurrent module, no cuDNN (cuDNN RNNs have no
double backward). First-order oracles keep the fast kernels.

:class:`LowerProducts` holds one lower-gradient graph at a point and batch and takes any number
of products from it; :func:`bilevel.hypergrad.implicit` uses one per distinct batch.

Data parallelism (:mod:`bilevel.distributed`, torchrun): each oracle differentiates
w_r l(x, y; B_r) on this rank's slice B_r of the global batch B (w_r = |B_r| / |B|) and sums
the results over the ranks, so it returns the single-process value on B (:func:`_split`).
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Any, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from . import distributed
from .tree import Tree

HVP_MODES = ("reverse", "forward")
ORACLE_KINDS = ("grad_upper", "grad_lower", "hvp", "cross")


class OracleCounts(dict):
    """Number of calls per oracle kind: grad_upper, grad_lower, hvp, cross."""

    def __init__(self, *args, **kwargs):
        super().__init__({kind: 0 for kind in ORACLE_KINDS})
        self.update(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.values())

    def __sub__(self, other: "OracleCounts") -> "OracleCounts":
        return OracleCounts({k: self[k] - other.get(k, 0) for k in self})

    def __add__(self, other) -> "OracleCounts":
        return OracleCounts({k: self[k] + (other or {}).get(k, 0) for k in self})


_ACTIVE: List[OracleCounts] = []


@contextlib.contextmanager
def count_calls() -> Iterator[OracleCounts]:
    """Count oracle calls made inside the block::

        with count_calls() as counts:
            solver.step(problem, state)
        counts["hvp"]
    """
    counts = OracleCounts()
    _ACTIVE.append(counts)
    try:
        yield counts
    finally:
        _ACTIVE.remove(counts)


#: Oracle calls made inside a torch.compile'd step (bilevel.compiled): traced as appends to this
#: list, which the compiled code replays at each call; the caller drains it into the counts.
#: (Incrementing the counts' ints inside the trace would make every call a new graph.)
DEFERRED: List[Tuple[str, int]] = []


_MODES: List[str] = []


def check_hvp_mode(mode: Optional[str], owner: str = "hvp_mode") -> Optional[str]:
    """``mode`` if it is None (the run's mode) or one of :data:`HVP_MODES`, else a ValueError."""
    if mode is not None and mode not in HVP_MODES:
        raise ValueError(f"{owner} must be one of {list(HVP_MODES)} (or None: the run's mode), got {mode!r}")
    return mode


@contextlib.contextmanager
def second_order_mode(mode: Optional[str]) -> Iterator[str]:
    """Within the block, second-order products whose mode is ``None`` use ``mode`` ("reverse"
    or "forward"; ``None`` keeps the enclosing block's). :func:`bilevel.solve` opens one for its
    ``hvp_mode`` option, so the option reaches every estimator and oracle a solver calls without
    a field on each solver; an estimator or call with an explicit mode keeps its own."""
    check_hvp_mode(mode)
    _MODES.append(mode if mode is not None else resolve_mode(None))
    try:
        yield _MODES[-1]
    finally:
        _MODES.pop()


def resolve_mode(mode: Optional[str]) -> str:
    """An explicit mode as is (checked); ``None``: the innermost :func:`second_order_mode`, else
    "reverse"."""
    if mode is None:
        return _MODES[-1] if _MODES else "reverse"
    if mode not in HVP_MODES:
        raise ValueError(f"hvp mode must be one of {HVP_MODES}, got {mode!r}")
    return mode


# -- kernels that can be differentiated twice -------------------------------------------------------

_RECURRENT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def has_recurrent_model(problem) -> bool:
    """Whether ``problem`` runs a recurrent network: its ``recurrent`` attribute when it sets one
    (a problem calling RNN kernels functionally), else whether it holds an ``nn.RNNBase``
    module (found once per problem object, by :func:`bilevel.device.holds_module`)."""
    declared = getattr(problem, "recurrent", None)
    if declared is not None:
        return bool(declared)
    try:
        return _RECURRENT[problem]
    except (KeyError, TypeError):
        pass
    from .device import holds_module
    found = holds_module(problem, torch.nn.RNNBase)
    try:
        _RECURRENT[problem] = found
    except TypeError:  # not weak-referenceable: decide again next time
        pass
    return found


def _sdp_switches():
    """[(getter, setter, wanted)] for every scaled-dot-product-attention backend flag, wanted
    True for the math backend only: the flags ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``
    sets, by the same ``torch._C`` functions (``_get_NAME_sdp_enabled``, ``_set_sdp_use_NAME``),
    looked up once. None when this torch lacks one of them: :func:`second_order` then uses
    ``sdpa_kernel`` itself."""
    names = ("cudnn", "flash", "mem_efficient", "overrideable", "math")
    try:
        return tuple((getattr(torch._C, f"_get_{name}_sdp_enabled"), getattr(torch._C, f"_set_sdp_use_{name}"),
                      name == "math") for name in names)
    except AttributeError:
        return None


_SDP_SWITCHES = _sdp_switches()
#: Whether this torch build has cuDNN at all: without it (CPU builds) the RNN switch has nothing
#: to turn off, and the problem's recurrent check is skipped.
_CUDNN_BUILT = torch.backends.cudnn.is_available()


class second_order:  # noqa: N801 (used as a function: ``with second_order(problem):``)
    """Kernels with double-backward and forward-mode rules, for the forward pass and the
    ``create_graph`` backward of a second-order product of ``problem``'s lower loss:

    * attention by the math implementation of ``F.scaled_dot_product_attention``
      (``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``): the flash kernels have no double
      backward (CPU: "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward
      is not implemented"; CUDA alike) and no forward-mode AD;
    * cuDNN off (``torch.backends.cudnn.enabled = False``) when the problem holds a
      recurrent network (:func:`has_recurrent_model`): cuDNN RNNs have no double backward. Only
      here: gradients elsewhere keep cuDNN (about 4x faster for an RNN on a GPU). On the CPU,
      where cuDNN is never used, this flag changes nothing.

    The kernels are chosen when the graph is recorded, so the context covers the lower forward
    and the create_graph backward; later backward passes through the recorded graph need none.
    While ``torch.compile`` traces (``compile=True`` runs) the context does nothing: dynamo
    cannot trace these context managers, and the compiled graph picks its own kernels (not
    checked on a GPU: a compiled step through fused attention or a cuDNN RNN may still fail).

    The attention switch sets and restores the same five backend flags (cuDNN, flash,
    memory-efficient, overrideable, math) that ``sdpa_kernel`` sets, through the setters it calls,
    looked up once (:data:`_SDP_SWITCHES`): about 2 us per entry instead of 18 us for
    ``sdpa_kernel``'s per-call lookups by name (one entry per hypergradient, bench/README.md);
    a class rather than a generator-based context manager for the same reason.
    """

    __slots__ = ("problem", "_previous", "_inner")

    def __init__(self, problem):
        self.problem, self._previous, self._inner = problem, None, None

    def __enter__(self) -> None:
        if torch.compiler.is_compiling():  # dynamo cannot trace these context managers (its own graph's kernels)
            return
        if _SDP_SWITCHES is None:  # a torch without the flag functions: the public context manager
            from torch.nn.attention import SDPBackend, sdpa_kernel
            self._inner = contextlib.ExitStack()
            self._inner.enter_context(sdpa_kernel(SDPBackend.MATH))
            if has_recurrent_model(self.problem):
                self._inner.enter_context(_cudnn_disabled())
            return
        previous = self._previous = [get() for get, _, _ in _SDP_SWITCHES]
        for (_, set_flag, wanted), enabled in zip(_SDP_SWITCHES, previous):
            if enabled != wanted:
                set_flag(wanted)
        if _CUDNN_BUILT and has_recurrent_model(self.problem):
            self._inner = _cudnn_disabled()
            try:
                self._inner.__enter__()
            except BaseException:
                self._restore()
                raise

    def __exit__(self, *exc_info) -> bool:
        try:
            if self._inner is not None:
                self._inner.__exit__(*exc_info)
        finally:
            self._restore()
        return False

    def _restore(self) -> None:
        if self._previous is not None:
            for (_, set_flag, wanted), enabled in zip(_SDP_SWITCHES, self._previous):
                if enabled != wanted:
                    set_flag(enabled)
            self._previous = None


@contextlib.contextmanager
def _cudnn_disabled() -> Iterator[None]:
    """cuDNN off, every other cuDNN setting untouched (``torch.backends.cudnn.flags`` would also
    reset benchmark, deterministic and allow_tf32 to its defaults inside the block)."""
    previous = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = previous


def _record(kind: str, n: int = 1) -> None:
    if torch.compiler.is_compiling():
        DEFERRED.append((kind, n))
        return
    for counts in _ACTIVE:
        counts[kind] += n


def _leaves(t: Tree) -> Tree:
    """Detached copies that require grad: fresh leaves of a new graph."""
    return {k: v.detach().requires_grad_(True) for k, v in t.items()}


def _grad(output: Tensor, inputs: Tree, create_graph: bool = False) -> Tree:
    values = torch.autograd.grad(
        output, list(inputs.values()), create_graph=create_graph, allow_unused=True,
        materialize_grads=True,
    )
    return dict(zip(inputs.keys(), values))


def _vjp(outputs: Tree, inputs: Tree, cotangent: Tree) -> Tree:
    """sum_k <outputs_k, cotangent_k> differentiated w.r.t. inputs (zeros where independent)."""
    keys = [k for k, v in outputs.items() if v.requires_grad]
    if not keys:
        return {k: torch.zeros_like(v) for k, v in inputs.items()}
    values = torch.autograd.grad(
        [outputs[k] for k in keys], list(inputs.values()),
        grad_outputs=[cotangent[k] for k in keys], allow_unused=True, materialize_grads=True,
    )
    return {k: v.detach() for k, v in zip(inputs.keys(), values)}


class _Local:
    """This rank's slice of a global batch and its weight w_r = |B_r| / |B| (data parallelism)."""
    __slots__ = ("batch", "weight")

    def __init__(self, batch: Tensor, weight: float):
        self.batch, self.weight = batch, weight


def _loss(loss_fn, x: Tree, y: Tree, batch: Any, which: str) -> Tensor:
    """``loss_fn(x, y, batch)`` checked to be 0-d; for a :class:`_Local` slice, the weighted
    local loss w_r l(x, y; B_r), whose derivatives summed over the ranks are those of l(x, y; B)."""
    if isinstance(batch, _Local):
        with distributed.on_slice(batch.weight):  # a loss coupled across the batch may gather (gather_batch)
            return _scalar(loss_fn(x, y, batch.batch), which) * batch.weight
    return _scalar(loss_fn(x, y, batch), which)


def _no_reduce(*trees):
    return trees


def _split(batch: Any):
    """(the batch to differentiate on, a function summing result trees over the ranks): this
    rank's :class:`_Local` slice and :func:`bilevel.distributed.all_reduce_trees` in a data
    parallel run (not inside torch.func transforms), else the batch as is and the identity."""
    part = distributed.shard(batch)  # None at once in one process
    if part is None or _transformed():
        return batch, _no_reduce
    return _Local(*part), distributed.all_reduce_trees


def _scalar(value: Tensor, which: str) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{which} must return a 0-d tensor, got {shape}")
    return value


def _transformed() -> bool:
    """True inside a torch.func transform (vmap of a solver's update, ...), where autograd leaves
    cannot be made (``requires_grad_``): the oracles then take the same derivatives with
    torch.func (:func:`_functional_grad`, :func:`_functional_second_order`)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _functional_grad(loss_fn, which: str, x: Tree, y: Tree, batch: Any, argnums) -> Any:
    """torch.func.grad of the loss w.r.t. x (0), y (1) or both ((0, 1))."""
    return torch.func.grad(lambda xx, yy: _loss(loss_fn, xx, yy, batch, which), argnums=argnums)(x, y)


def _functional_second_order(problem, x, y, batch):
    """(grad_y g, its vjp v -> (d2_xy g . v, d2_yy g . v)) by torch.func.vjp of torch.func.grad."""
    def grad_y(xx, yy):
        return torch.func.grad(lambda a, b: _loss(problem.lower_loss, a, b, batch, "lower_loss"), argnums=1)(xx, yy)
    with second_order(problem):  # twice-differentiable kernels (attention, RNNs), chosen at the forward
        return torch.func.vjp(grad_y, x, y)


def _grad_both(loss_fn, which: str, x: Tree, y: Tree, batch: Any) -> Tuple[Tree, Tree]:
    if _transformed():
        return _functional_grad(loss_fn, which, x, y, batch, (0, 1))
    xl, yl = _leaves(x), _leaves(y)
    loss = _loss(loss_fn, xl, yl, batch, which)
    grads = torch.autograd.grad(loss, [*xl.values(), *yl.values()], allow_unused=True, materialize_grads=True)
    return dict(zip(xl, grads[:len(xl)])), dict(zip(yl, grads[len(xl):]))


def grad_upper(problem, x: Tree, y: Tree, batch: Any) -> Tuple[Tree, Tree]:
    """(grad_x f, grad_y f) at (x, y) on ``batch``. Counts one ``grad_upper``."""
    _record("grad_upper")
    batch, reduce = _split(batch)
    return reduce(*_grad_both(problem.upper_loss, "upper_loss", x, y, batch))


def grad_lower(problem, x: Tree, y: Tree, batch: Any) -> Tuple[Tree, Tree]:
    """(grad_x g, grad_y g) at (x, y) on ``batch``. Counts one ``grad_lower``."""
    _record("grad_lower")
    batch, reduce = _split(batch)
    return reduce(*_grad_both(problem.lower_loss, "lower_loss", x, y, batch))


def _grad_one(loss_fn, which: str, x: Tree, y: Tree, batch: Any, wrt: str) -> Tree:
    """The gradient of ``loss_fn`` w.r.t. x or y only (``wrt``); the other variable enters
    detached, so autograd never computes the unused gradient."""
    batch, reduce = _split(batch)
    if _transformed():
        return _functional_grad(loss_fn, which, x, y, batch, 0 if wrt == "x" else 1)
    return reduce(_grad_one_local(loss_fn, which, x, y, batch, wrt))[0]


def _grad_one_local(loss_fn, which: str, x: Tree, y: Tree, batch: Any, wrt: str) -> Tree:
    xl = _leaves(x) if wrt == "x" else {k: v.detach() for k, v in x.items()}
    yl = _leaves(y) if wrt == "y" else {k: v.detach() for k, v in y.items()}
    loss, inputs = _loss(loss_fn, xl, yl, batch, which), xl if wrt == "x" else yl
    if not loss.requires_grad:  # the loss does not depend on that variable (e.g. f free of y)
        return {k: torch.zeros_like(v) for k, v in inputs.items()}
    return {k: v.detach() for k, v in _grad(loss, inputs).items()}


def grad_upper_x(problem, x: Tree, y: Tree, batch: Any) -> Tree:
    """grad_x f at (x, y) on ``batch``. Counts one ``grad_upper``."""
    _record("grad_upper")
    return _grad_one(problem.upper_loss, "upper_loss", x, y, batch, "x")


def grad_upper_y(problem, x: Tree, y: Tree, batch: Any) -> Tree:
    """grad_y f at (x, y) on ``batch``. Counts one ``grad_upper``."""
    _record("grad_upper")
    return _grad_one(problem.upper_loss, "upper_loss", x, y, batch, "y")


def grad_lower_x(problem, x: Tree, y: Tree, batch: Any) -> Tree:
    """grad_x g at (x, y) on ``batch``. Counts one ``grad_lower``."""
    _record("grad_lower")
    return _grad_one(problem.lower_loss, "lower_loss", x, y, batch, "x")


def grad_lower_y(problem, x: Tree, y: Tree, batch: Any) -> Tree:
    """grad_y g at (x, y) on ``batch``. Counts one ``grad_lower``."""
    _record("grad_lower")
    return _grad_one(problem.lower_loss, "lower_loss", x, y, batch, "y")


def _reverse_graph(problem, x, y, batch):
    """Leaves (x, y) and grad_y g at them with its graph kept (create_graph): every later
    product d/d(x, y) <grad_y g, v> is one backward pass through it, no new forward."""
    xl, yl = _leaves(x), _leaves(y)
    with second_order(problem):
        loss = _loss(problem.lower_loss, xl, yl, batch, "lower_loss")
        return xl, yl, _grad(loss, yl, create_graph=True)


def _reverse_second_order(problem, x, y, v, batch, want_hvp, want_cross):
    if _transformed():
        gy, products = _functional_second_order(problem, x, y, batch)
        cr, hv = products({k: v[k] for k in gy})
        return hv if want_hvp else None, cr if want_cross else None, gy
    xl, yl, gy = _reverse_graph(problem, x, y, batch)
    inputs = {**({("y", k): t for k, t in yl.items()} if want_hvp else {}),
              **({("x", k): t for k, t in xl.items()} if want_cross else {})}
    out = _vjp(gy, inputs, v)
    hv = {k: out[("y", k)] for k in y} if want_hvp else None
    cr = {k: out[("x", k)] for k in x} if want_cross else None
    return hv, cr, {k: t.detach() for k, t in gy.items()}


# Problems whose forward-mode products needed a fallback: "no_onednn" or "reverse".
_FORWARD_FALLBACK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _remembered_fallback(problem) -> Optional[str]:
    try:
        return _FORWARD_FALLBACK.get(problem)
    except TypeError:  # unhashable or not weak-referenceable: decide again at each call
        return None


def _remember_fallback(problem, kind: str) -> None:
    try:
        _FORWARD_FALLBACK[problem] = kind
    except TypeError:
        pass


def _forward_second_order(problem, x, y, v, batch, want_hvp, want_cross):
    """Forward-over-reverse products: one ``torch.func.jvp`` of ``torch.func.grad`` along v in
    y, whose primal output is the gradient and whose tangent holds both products,

        d/dt grad g(x, y + t v) |_{t=0} = (d2_xy g . v, d2_yy g . v),

    (the gradient in x only when the cross product is wanted). Returns (hvp, cross, grad_y g),
    ``None`` for a product not wanted. When an operation has no forward-mode rule (the oneDNN
    LSTM kernel, an autograd.Function without jvp), retry with oneDNN off, then in reverse mode;
    the error is re-raised only if reverse mode fails too (a genuine error in the loss)."""
    xd = {k: t.detach() for k, t in x.items()}
    yd = {k: t.detach() for k, t in y.items()}
    vd = {k: v[k].detach() for k in y}  # jvp needs the tangent's keys in the primal's order

    def lower(xx, yy):
        return _loss(problem.lower_loss, xx, yy, batch, "lower_loss")

    def compute():
        with second_order(problem):
            return products()

    def products():
        if want_cross:
            (_, gy), (cr, hv) = torch.func.jvp(lambda yy: torch.func.grad(lower, argnums=(0, 1))(xd, yy), (yd,), (vd,))
            return (hv if want_hvp else None), cr, gy
        gy, hv = torch.func.jvp(lambda yy: torch.func.grad(lower, argnums=1)(xd, yy), (yd,), (vd,))
        return hv, None, gy

    fallback = _remembered_fallback(problem)
    if fallback is None:
        try:
            return compute()
        except (NotImplementedError, RuntimeError) as error:
            first_error = error
        fallback = "no_onednn"
    if fallback == "no_onednn":
        try:
            with torch.backends.mkldnn.flags(enabled=False):
                result = compute()
            _remember_fallback(problem, "no_onednn")
            return result
        except (NotImplementedError, RuntimeError) as error:
            first_error = error
    try:
        result = _reverse_second_order(problem, x, y, v, batch, want_hvp, want_cross)
    except Exception:
        raise first_error
    if _remembered_fallback(problem) != "reverse":
        _remember_fallback(problem, "reverse")
        warnings.warn(
            f"{type(problem).__name__}: forward-mode AD failed ({type(first_error).__name__}: "
            f"{str(first_error).splitlines()[0][:120]}); second-order oracles use reverse-over-reverse.",
            RuntimeWarning, stacklevel=3)
    return result


def _second_order(problem, x, y, v, batch, mode, want_hvp, want_cross, want_grad=False):
    """(hvp, cross, grad_y g) in ``mode`` (None: the run's), counting the products wanted
    (grad_y g: None unless ``want_grad``)."""
    mode = resolve_mode(mode)
    if want_hvp:
        _record("hvp")
    if want_cross:
        _record("cross")
    batch, reduce = _split(batch)
    if mode == "reverse":
        hv, cr, gy = _reverse_second_order(problem, x, y, v, batch, want_hvp, want_cross)
    else:
        hv, cr, gy = _forward_second_order(problem, x, y, v, batch, want_hvp, want_cross)
    return reduce(hv, cr, gy if want_grad else None)


class LowerProducts:
    """Second-order products of g at one point (x, y) on one batch, sharing one gradient graph.

    Reverse mode builds grad_y g(x, y; batch) once, with its graph (one lower forward and one
    create_graph backward), on first use; then every product is one backward pass through it,

        hvp(v)   = d/dy <grad_y g, v> = d2_yy g . v,      cross(v) = d/dx <grad_y g, v> = d2_xy g . v,

    with the graph retained until this object is dropped. The values are those of :func:`hvp` and
    :func:`cross` bit for bit (the same kernels on the same graph); a K-product CG hypergradient
    runs one lower forward instead of K + 1. Forward mode (``"forward"``) runs one
    ``torch.func.jvp`` of ``torch.func.grad`` per product, as :func:`hvp` does: a linearization
    reused across products (``torch.func.linearize``) traces the gradient once per point, which
    costs about 0.5 s on CPU, far more than the products it would save (bench/README.md).
    ``mode=None``: the run's mode (:func:`second_order_mode`), fixed when the object is built.
    Counts one ``hvp`` or ``cross`` per product, as the one-shot functions.
    """

    __slots__ = ("problem", "x", "y", "batch", "mode", "_graph", "_sparse", "_reduce", "_functional", "_reverse_mode",
                 "_fast")

    def __init__(self, problem, x: Tree, y: Tree, batch: Any, mode: Optional[str] = None):
        mode = resolve_mode(mode)
        batch, self._reduce = _split(batch)  # this rank's slice in a data-parallel run
        self.problem, self.x, self.y, self.batch, self.mode = problem, x, y, batch, mode
        self._reverse_mode = mode == "reverse"
        self._graph = None
        self._sparse = set()
        # wrt -> (outputs, keys, names, leaves): the plain one-process reverse-mode product,
        # set after its first call succeeded with every leaf in the graph; the products then
        # skip every check (the Neumann and CG loops call them K times per hypergradient).
        self._fast = {}
        # Checked once per object (not per product): an object is built and used inside the same
        # torch.func transform level (one hypergradient), and the one-process identity reduce
        # is skipped rather than called per product.
        self._functional = _transformed()
        if self._reduce is _no_reduce:
            self._reduce = None  # "x" / "y" when some of those leaves do not enter grad_y g

    def _build(self):
        """(outputs, their keys, {"y": (names, leaves), "x": (names, leaves)}): the parts of
        grad_y g's graph that the products pass to ``torch.autograd.grad``, built once."""
        xl, yl, gy = _reverse_graph(self.problem, self.x, self.y, self.batch)
        keys = [k for k, t in gy.items() if t.requires_grad]
        self._graph = ([gy[k] for k in keys], keys,
                       {"y": (list(yl), list(yl.values())), "x": (list(xl), list(xl.values()))})
        return self._graph

    def _reverse(self, v: Tree, wrt: str) -> Tree:
        if self._functional:  # inside torch.func transforms: one vjp closure of grad_y g per point
            if self._graph is None:
                self._graph = _functional_second_order(self.problem, self.x, self.y, self.batch)[1]
            cross, hv = self._graph({k: v[k] for k in self.y})
            return hv if wrt == "y" else cross
        outputs, keys, inputs = self._graph or self._build()
        names, leaves = inputs[wrt]
        if not keys:  # grad_y g independent of (x, y): every product is zero
            return {k: torch.zeros_like(t) for k, t in zip(names, leaves)}
        # Gradients of a graph-free backward (no create_graph) never require grad: no detach.
        # Every leaf is assumed to enter the graph (the cheaper call) until one does not; then
        # unused leaves get zeros for the rest of this graph's products.
        cotangents = [v[k] for k in keys]
        if wrt not in self._sparse:
            try:
                out = dict(zip(names, torch.autograd.grad(outputs, leaves, cotangents, retain_graph=True)))
                if self._reduce is None:
                    self._fast[wrt] = (outputs, keys, names, leaves)
                return out
            except RuntimeError as error:
                if "not have been used in the graph" not in str(error):
                    raise
                self._sparse.add(wrt)
        values = torch.autograd.grad(outputs, leaves, cotangents, retain_graph=True, allow_unused=True,
                                     materialize_grads=True)
        return dict(zip(names, values))

    def hvp(self, v: Tree) -> Tree:
        """d2_yy g . v. Counts one ``hvp``."""
        _record("hvp")
        return self._product(v, "y")

    def cross(self, v: Tree) -> Tree:
        """d2_xy g . v, shaped like x. Counts one ``cross``."""
        _record("cross")
        return self._product(v, "x")

    def _product(self, v: Tree, wrt: str) -> Tree:
        """d/d(wrt) <grad_y g, v>: the checked-once fast path, else reverse or forward mode."""
        fast = self._fast.get(wrt)
        if fast is not None:
            outputs, keys, names, leaves = fast
            return dict(zip(names, torch.autograd.grad(outputs, leaves, [v[k] for k in keys], retain_graph=True)))
        if self._reverse_mode:
            out = self._reverse(v, wrt)
        else:
            hv, cr, _ = _forward_second_order(self.problem, self.x, self.y, v, self.batch, wrt == "y", wrt == "x")
            out = hv if wrt == "y" else cr
        return out if self._reduce is None else self._reduce(out)[0]


def hvp(problem, x: Tree, y: Tree, v: Tree, batch: Any, mode: Optional[str] = None) -> Tree:
    """d2_yy g(x, y; batch) . v (``mode`` None: the run's). Counts one ``hvp``."""
    return _second_order(problem, x, y, v, batch, mode, True, False)[0]


def cross(problem, x: Tree, y: Tree, v: Tree, batch: Any, mode: Optional[str] = None) -> Tree:
    """d2_xy g(x, y; batch) . v, shaped like x (``mode`` None: the run's). Counts one ``cross``."""
    return _second_order(problem, x, y, v, batch, mode, False, True)[1]


def hvp_and_cross(problem, x: Tree, y: Tree, v: Tree, batch: Any,
                  mode: Optional[str] = None) -> Tuple[Tree, Tree, Tree]:
    """(d2_yy g . v, d2_xy g . v, grad_y g) from one pass on one batch.

    Single-loop solvers (SOBA and kin) need all three at the same point and sample; sharing the
    graph makes that cost about one HVP: one double backward in reverse mode, one jvp of the
    gradient in forward mode (its primal output is grad_y g). ``mode`` None: the run's
    (:func:`second_order_mode`). Counts one ``hvp``, one ``cross`` and one ``grad_lower``.
    """
    _record("grad_lower")
    hv, cr, gy = _second_order(problem, x, y, v, batch, mode, True, True, want_grad=True)
    return hv, cr, {k: t.detach() for k, t in gy.items()}
