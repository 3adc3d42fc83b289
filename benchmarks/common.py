"""Shared pieces of the sd_zoo benchmarks: variants on shared weights, alternating timing, results files.

Every benchmark times its variants in ONE process, round-robin (the order rotates each repetition), so that
machine noise hits all of them alike; it reports medians and ratios against constant depth.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import os
import platform
import shlex
import statistics
import sys
import time
import types
import warnings
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import timm
import torch
import torch._dynamo.utils
import torch.nn.functional as F
from torch import nn

import sd_zoo  # noqa: F401  (registers the sd_ models)
from sd_zoo.hub import write_text_atomic

_SETTINGS: Dict[str, Any] = {'flush_denormal': False}
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')

# peer name -> factory of the mask-multiply module applied to a block's branch output, given the drop rate
PEERS: Dict[str, Callable[[float], nn.Module]] = {}


def _register_peers() -> None:
    from timm.layers import DropPath
    from torchvision.ops import StochasticDepth as TVStochasticDepth
    PEERS['timm DropPath'] = lambda rate: DropPath(rate)
    PEERS['torchvision SD batch'] = lambda rate: TVStochasticDepth(rate, 'batch')
    PEERS['torchvision SD row'] = lambda rate: TVStochasticDepth(rate, 'row')


_register_peers()


# ---------------------------------------------------------------------------------------------------------------
# Machine and options


def attempt_parser(doc: str) -> argparse.ArgumentParser:
    """The options of the compile attempts (``benchmarks/attempts``): the device options, one ``MODEL:BATCH``
    config and the bootstrap's resamples; read them with :func:`parse_attempt_args`."""
    parser = argparse.ArgumentParser(description=doc.split('\n')[0])
    add_device_args(parser)
    parser.add_argument('--config', default='sd_resnet56_cifar:64', metavar='MODEL:BATCH')
    parser.add_argument('--bootstrap', type=int, default=2000)
    return parser


def parse_attempt_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
                       reps: int) -> argparse.Namespace:
    """Parse an :func:`attempt_parser`'s options: ``args.model`` and ``args.batch`` from ``--config``, and
    ``reps`` repetitions unless ``--reps`` (or ``--quick``, 3) says otherwise."""
    args = parser.parse_args(argv)
    args.model, args.batch = args.config.split(':')[0], int(args.config.split(':')[1])
    args.reps = args.reps or (3 if args.quick else reps)
    return args


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """Options every benchmark shares (the GPU run is the same command with ``--device cuda --bf16 ...``)."""
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (default: cpu)")
    parser.add_argument('--bf16', action='store_true', help='autocast to bfloat16')
    parser.add_argument('--channels-last', action='store_true', help='channels_last memory format')
    parser.add_argument('--quick', action='store_true', help='small sizes and few repetitions (a fast check)')
    parser.add_argument('--reps', type=int, default=None, help='timed repetitions per variant')
    parser.add_argument('--out', default=RESULTS_DIR, help=f'results folder (default: {RESULTS_DIR})')
    parser.add_argument('--tag', default=None, help='results file suffix (default: the device type)')
    parser.add_argument('--clock', choices=('cpu', 'wall'), default=None,
                        help='clock of the headline ratios (default: cpu on a CPU device, wall on a GPU)')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch default)')
    parser.add_argument('--keep-denormals', action='store_true',
                        help='do not flush denormals to zero on the CPU (see apply_device_args)')


def apply_device_args(args: argparse.Namespace) -> torch.device:
    """Check the device, set threads and the headline clock; returns the device."""
    device = check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    # After ~10 SGD steps on a fixed random batch some values turn denormal and a CPU step gets ~10x
    # slower (measured on sd_resnet20_cifar); that would time the FPU's slow path, not the network.
    args.flush_denormal = not args.keep_denormals and torch.set_flush_denormal(True)
    _SETTINGS['flush_denormal'] = args.flush_denormal
    args.clock = args.clock or ('cpu' if device.type == 'cpu' else 'wall')
    return device


def check_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f"--device {name} was asked for but torch.cuda.is_available() is False: "
                         f"run on a machine with a CUDA GPU or use --device cpu")
    return device


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> Dict[str, Any]:
    """What the numbers were measured on."""
    import torchvision
    info = {
        'cpu': _cpu_model(), 'cpu_cores': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
        'load_average_at_start': [round(v, 2) for v in os.getloadavg()],
        'python': platform.python_version(), 'torch': torch.__version__,
        'torchvision': torchvision.__version__, 'timm': timm.__version__, 'sd_zoo': sd_zoo.__version__,
        'flush_denormal': _SETTINGS['flush_denormal'], 'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY'),
        'device': str(device), 'date_utc': time.strftime('%Y-%m-%d %H:%M', time.gmtime()),
    }
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    return info


def reproduce_command(module: str, argv: Optional[Sequence[str]]) -> str:
    """The command line of this run (``argv=None``: the process's own arguments), from the repository root."""
    args = sys.argv[1:] if argv is None else list(argv)
    return ' '.join(['python', '-m', f'benchmarks.{module}'] + [shlex.quote(a) for a in args])


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------
# Variants on shared weights


def create_sd(model_name: str, mode: str, state_dict: Optional[Mapping[str, torch.Tensor]] = None,
              seed: int = 0, **kwargs: Any) -> nn.Module:
    """An ``sd_`` model in ``mode`` ('block', 'sample' or 'off' = constant depth), loaded with ``state_dict``."""
    rate = 0.0 if mode == 'off' else kwargs.pop('drop_path_rate', 0.5)
    model = timm.create_model(model_name, drop_path_mode=mode, drop_path_rate=rate, drop_path_seed=seed, **kwargs)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def _peer_branch(block: nn.Module, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return block.peer_drop(type(block).branch(block, x, scale))


def add_peer_drop(model: nn.Module, peer: str, survival: Sequence[float]) -> nn.Module:
    """Give every residual block of a constant-depth ``sd_`` model a peer's mask-multiply on its branch.

    The block then computes ``act(shortcut + peer_drop(branch(x)))``, the combine of timm's ResNet blocks
    (``x = self.drop_path(x); x += shortcut``), with drop rate 1 - p_l per block.
    """
    if model.stochastic_depth.mode != 'off':
        raise ValueError('add_peer_drop needs a constant-depth model (drop_path_mode="off")')
    for block, p in zip(model.sd_blocks(), survival):
        block.peer_drop = PEERS[peer](1.0 - p)
        block.branch = types.MethodType(_peer_branch, block)
    return model


def timm_resnet_with_drop_path(timm_name: str, state_dict: Mapping[str, torch.Tensor],
                               survival: Optional[Sequence[float]]) -> nn.Module:
    """timm's own ResNet on our weights; with ``survival``, its DropPath at our per-block rates."""
    from timm.layers import DropPath
    model = timm.create_model(timm_name, num_classes=1000)
    model.load_state_dict(state_dict)
    if survival is not None:
        blocks = [b for name in ('layer1', 'layer2', 'layer3', 'layer4') for b in getattr(model, name)]
        if len(blocks) != len(survival):
            raise ValueError(f'{timm_name} has {len(blocks)} blocks, the schedule {len(survival)}')
        for block, p in zip(blocks, survival):
            block.drop_path = DropPath(1.0 - p)
    return model


def prepare(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def compile_isolated(model: nn.Module, backend: str = 'inductor', isolate: bool = True) -> nn.Module:
    """``torch.compile(model)`` with entries of its own in dynamo's cache (``isolate_recompiles``).

    A benchmark compiles several models of the package in one process, and they share its code objects. Without
    isolation a call can match a frame compiled for another model: a block-mode model's ``forward`` breaks its
    graph at ``forward_features`` and so guards on nothing that tells the modes apart, and a constant-depth model
    compiled beside it ran through that entry, its graph split in two, after one recompile (found in
    ``benchmarks.compile``; tests/test_benchmarks.py shows both). A model compiled alone is what a user runs.
    A torch without the option (it came with 2.14) compiles without it, with a warning: the compile benchmark's
    untimed round then shows whether the models met each other's entries."""
    if 'isolate_recompiles' not in inspect.signature(torch.compile).parameters:
        warnings.warn(f'torch {torch.__version__} has no torch.compile(isolate_recompiles=...): the compiled models '
                      'of this benchmark share cache entries (install the pinned torch: make install)')
        return torch.compile(model, backend=backend)
    return torch.compile(model, backend=backend, isolate_recompiles=isolate)


def compile_events(graphs_before: int) -> Dict[str, Any]:
    """Graphs compiled since ``graphs_before`` (dynamo's ``unique_graphs``), and the recompiles among the frames
    compiled since the last :func:`clear_compile_events`, with the guard failures that caused them (from dynamo's
    compilation metrics: one record per frame compiled, a recompile names the guard that failed)."""
    metrics = torch._dynamo.utils.get_compilation_metrics()
    reasons = [m.recompile_reason for m in metrics if m.recompile_reason]
    return {'graphs': torch._dynamo.utils.counters['stats']['unique_graphs'] - graphs_before,
            'recompiles': len(reasons), 'recompile_reasons': sorted({r.split('\n')[0][:160] for r in reasons})}


def clear_compile_events() -> int:
    """Start counting compile events afresh (with room for every frame compiled: dynamo keeps a bounded number of
    records); returns the graph count to pass to :func:`compile_events`."""
    torch._dynamo.utils.clear_compilation_metrics()
    torch._dynamo.utils.set_compilation_metrics_limit(1_000_000)
    return torch._dynamo.utils.counters['stats']['unique_graphs']


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    """The paper's optimizer (Nesterov momentum 0.9, weight decay 1e-4); a small lr keeps weights tame."""
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Steps and timing


class TrainStep:
    """One training step (forward, backward, SGD step) of a model on a fixed batch, timed by phase."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, bf16: bool):
        self.model, self.x, self.y, self.device, self.bf16 = model.train(), x, y, device, bf16
        self.optimizer = sgd(model)
        self.phases: List[Dict[str, float]] = []

    def __call__(self) -> None:
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.bf16):
            loss = F.cross_entropy(self.model(self.x), self.y)
        synchronize(self.device)
        t1 = time.perf_counter()
        loss.backward()
        synchronize(self.device)
        t2 = time.perf_counter()
        self.optimizer.step()
        synchronize(self.device)
        self.phases.append({'forward': t1 - t0, 'backward': t2 - t1, 'optimizer': time.perf_counter() - t2})


def profile_table(step: TrainStep, rows: int = 12) -> str:
    """The heaviest operators of one step (self CPU time), as torch.profiler prints them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=rows, max_name_column_width=60)


def alternate(steps: Mapping[str, Callable[[], Any]], reps: int, warmup: int = 1,
              device: torch.device = torch.device('cpu'),
              after_each: Optional[Callable[[str, int], None]] = None) -> Dict[str, Dict[str, List[float]]]:
    """Time each callable ``reps`` times, round-robin with the order rotated every repetition.

    Returns ``{'wall': {name: seconds}, 'cpu': {name: seconds}}``: wall-clock time and this process's CPU
    time (all threads). On a shared machine the CPU time is the steadier measure of the work done.
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    synchronize(device)
    wall: Dict[str, List[float]] = {name: [] for name in names}
    cpu: Dict[str, List[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[name]()
            synchronize(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            if after_each is not None:
                after_each(name, rep)
        print(f'  repetition {rep + 1}/{reps} done', file=sys.stderr, flush=True)
    return {'wall': wall, 'cpu': cpu}


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio_table(times: Mapping[str, Mapping[str, Sequence[float]]], baseline: str) -> Dict[str, Dict[str, float]]:
    """Per variant: median seconds and ratio of medians against ``baseline``, by wall clock and CPU time."""
    table: Dict[str, Dict[str, float]] = {}
    for clock, by_name in times.items():
        base = median(by_name[baseline])
        for name, t in by_name.items():
            entry = table.setdefault(name, {'reps': len(t)})
            entry[f'{clock}_median_s'] = median(t)
            entry[f'{clock}_ratio'] = median(t) / base
    return table


# ---------------------------------------------------------------------------------------------------------------
# Memory


@contextlib.contextmanager
def saved_activation_bytes(model: nn.Module) -> Iterator[Dict[str, int]]:
    """Bytes of the tensors autograd saves for backward (distinct storages, parameters excluded).

    This is the activation memory a training step holds at the peak between forward and backward; it is
    exact on any device, unlike CPU allocator statistics.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: Dict[int, int] = {}
    result = {'bytes': 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result['bytes'] = sum(seen.values())


# ---------------------------------------------------------------------------------------------------------------
# Output


def write_results(out_dir: str, stem: str, payload: Dict[str, Any], markdown: str) -> List[str]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``out_dir``, print the tables and how to reproduce them;
    returns the paths."""
    json_path, md_path = os.path.join(out_dir, f'{stem}.json'), os.path.join(out_dir, f'{stem}.md')
    write_text_atomic(json_path, json.dumps(payload, indent=2, sort_keys=False) + '\n')
    write_text_atomic(md_path, markdown)
    print(markdown)
    print('written:', ', '.join([json_path, md_path]))
    print('reproduce:', payload['command'])
    return [json_path, md_path]


def machine_line(info: Mapping[str, Any]) -> str:
    where = info.get('gpu') or f"{info['cpu']}, {info['cpu_cores']} cores ({info['torch_threads']} torch threads)"
    denormals = '; denormals flushed to zero' if info.get('flush_denormal') else ''
    if info.get('omp_wait_policy'):
        denormals += f"; OMP_WAIT_POLICY={info['omp_wait_policy']}"
    return (f"{where}; torch {info['torch']}, torchvision {info['torchvision']}, timm {info['timm']}; "
            f"load average at start {info['load_average_at_start']}{denormals}; {info['date_utc']} UTC")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines) + '\n'


def code_copy(fn: Callable, name: str) -> Callable:
    """``fn`` with a code object of its own: dynamo keeps compiled graphs (and caps their number) and marks frames
    skipped per code object."""
    return types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name)


def copy_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
