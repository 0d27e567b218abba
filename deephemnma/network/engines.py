"""Execution engines behind the one training loop: ``single``, ``ddp`` and ``horovod``.

An :class:`Engine` hides what differs between one process and data-parallel ranks: wrapping
the model and optimiser, averaging gradients, summing metrics, synchronising buffers and
broadcasting objects. The training loop (:mod:`.train`) is the same for all three.

Data parallelism and learning rate (one rule for both distributed engines):

* ``batch_size`` is the batch of ONE rank for one forward/backward pass (a micro-batch).
  A step's global batch is ``batch_size × world_size × accumulate``; every rank sees a
  disjoint contiguous slice of it (rank-major: rank r gets micro-batches
  ``r·accumulate … (r+1)·accumulate − 1`` of the step), so a single process with
  ``accumulate = N`` sees exactly the same micro-batches as N ranks with ``accumulate = 1``.
* Gradients are averaged over ranks (DDP's all-reduce / Horovod's ``op=Average``) and over
  the accumulated micro-batches (the loss is divided by ``accumulate``): the update is the
  mean-loss gradient of the global batch.
* ``scale_lr: linear`` (the default) multiplies the learning rate by
  ``world_size × accumulate`` — the global batch over the per-rank batch — the linear
  scaling rule of Goyal et al. (2017) that Horovod recommends, meant to be used with the
  warm-up of the fast recipe; ``scale_lr: none`` keeps the configured rate.

Batch normalisation: each rank normalises with its own micro-batch statistics (as does the
single process with ``accumulate``, micro-batch by micro-batch); the running statistics are
averaged over ranks at the end of every epoch (:meth:`Engine.average_buffers`) so that
every rank, and every checkpoint, holds the same model. (SyncBatchNorm would change the
per-rank arithmetic and does not run on CPU.)

Launching
---------
* ``single``: ``deephemnma train ...``.
* ``ddp``: ``torchrun --standalone --nproc-per-node N -m deephemnma train ... --set
  network.engine=ddp`` (gloo on CPU, NCCL on GPU; one GPU per rank = ``LOCAL_RANK``).
  Under SLURM without torchrun, ``srun`` tasks are recognised (SLURM_PROCID/SLURM_STEP_NUM_TASKS;
  MASTER_ADDR defaults to the first node of the job, MASTER_PORT to 29500 + job id mod 1000).
* ``horovod``: ``horovodrun -np N -H localhost:N --gloo python -m deephemnma train ... --set
  network.engine=horovod`` on one node; across nodes ``horovodrun -np N -H h1:4,h2:4``
  (needs ssh) or, with an MPI build of Horovod, ``srun python -m deephemnma train ...``.
  A gloo-only build under ``srun`` is bootstrapped here: rank 0 starts Horovod's gloo
  rendezvous server (see :func:`_horovod_gloo_bootstrap_from_slurm`).
* ``auto`` picks ``horovod`` when started by horovodrun (HOROVOD_RANK), ``ddp`` under
  torchrun (TORCHELASTIC_RUN_ID or RANK/WORLD_SIZE); under mpirun or an srun step with
  several tasks, ``horovod`` if it is installed, else ``ddp``; otherwise ``single``.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import subprocess

import numpy as np
import torch
import torch.nn as nn

from ..core.errors import ConfigError
from ..core.device import pick_device
from ..core.logs import get_logger

log = get_logger(__name__)

ENGINES = ("auto", "single", "ddp", "horovod")


def _share_cpu_threads(local_size: int) -> None:
    """Ranks on one node share its cores: at most cores // local_size threads per rank."""
    if local_size <= 1:
        return
    from ..core.runtime import default_threads

    n = max(1, min(torch.get_num_threads(), default_threads() // local_size))
    torch.set_num_threads(n)


class Engine:
    """One process (``single``); the distributed engines override the collective parts."""

    name = "single"

    def __init__(self, device: str = "auto"):
        self.rank = 0
        self.world_size = 1
        self.local_rank = 0
        self.local_size = 1
        self.device = pick_device(device, 0, "network.device")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- model / optimiser ---------------------------------------------------------------
    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module to call for training forward passes (DDP wraps; others return it)."""
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module,
                       accumulate: int) -> torch.optim.Optimizer:
        return optimizer

    def broadcast_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Make every rank start from rank 0's parameters, buffers and optimiser state."""

    def no_sync(self, wrapped: nn.Module, last_micro_batch: bool):
        """Context for a backward pass that must not all-reduce yet (gradient accumulation)."""
        return contextlib.nullcontext()

    def optimizer_step(self, optimizer, scaler=None, clip_grad: float = 0.0, parameters=None) -> None:
        """Unscale (mixed precision), clip, step — with the averaged gradients."""
        if scaler is not None:
            scaler.unscale_(optimizer)
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(list(parameters), clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

    # -- collectives ----------------------------------------------------------------------
    def all_sum(self, values) -> np.ndarray:
        """Element-wise sum over ranks of a float64 array."""
        return np.asarray(values, dtype=np.float64)

    def average_buffers(self, model: nn.Module) -> None:
        """Average floating-point buffers (BatchNorm running statistics) over ranks."""

    def broadcast_object(self, obj):
        return obj

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return f"{self.name} (world size {self.world_size}, device {self.device})"


# ----------------------------------------------------------------------------- DDP
class DDPEngine(Engine):
    """torch.distributed data parallel; gloo on CPU, NCCL on GPU; launched by torchrun or srun."""

    name = "ddp"

    def __init__(self, device: str = "auto", backend: str | None = None, timeout_s: float = 1800):
        import torch.distributed as dist

        env = os.environ
        if "RANK" not in env and slurm_step_tasks() > 1:
            _ddp_env_from_slurm()
        if "RANK" not in env or "WORLD_SIZE" not in env:
            raise ConfigError("engine ddp needs RANK and WORLD_SIZE: launch with torchrun "
                              "(torchrun --standalone --nproc-per-node N -m deephemnma train ...) or srun")
        self.rank = int(env["RANK"])
        self.world_size = int(env["WORLD_SIZE"])
        self.local_rank = int(env.get("LOCAL_RANK", self.rank))
        self.local_size = int(env.get("LOCAL_WORLD_SIZE", self.world_size))
        self.device = pick_device(device, self.local_rank, "network.device")
        if backend is None:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            kw = {"device_id": self.device} if self.device.type == "cuda" else {}
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
        self.dist = dist
        self.backend = backend
        if self.device.type == "cpu":
            _share_cpu_threads(self.local_size)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        # Buffers are averaged once per epoch instead of broadcast from rank 0 every forward.
        return DDP(model, device_ids=ids, broadcast_buffers=False)

    def broadcast_state(self, model, optimizer) -> None:
        # DDP's constructor broadcasts parameters; after a resume every rank loaded the same
        # checkpoint. Broadcast anyway so that ranks can never silently diverge.
        for t in list(model.state_dict().values()):
            self.dist.broadcast(t.data if isinstance(t, nn.Parameter) else t, src=0)

    def no_sync(self, wrapped, last_micro_batch: bool):
        return contextlib.nullcontext() if last_micro_batch else wrapped.no_sync()

    def _tensor(self, values) -> torch.Tensor:
        dev = self.device if self.backend == "nccl" else torch.device("cpu")
        return torch.as_tensor(np.asarray(values, dtype=np.float64), device=dev)

    def all_sum(self, values) -> np.ndarray:
        t = self._tensor(values)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM)
        return t.cpu().numpy()

    def average_buffers(self, model) -> None:
        for b in model.buffers():
            if b.is_floating_point():
                self.dist.all_reduce(b, op=self.dist.ReduceOp.SUM)
                b.div_(self.world_size)

    def broadcast_object(self, obj):
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        self.dist.barrier()

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


def slurm_step_tasks() -> int:
    """Tasks of the current srun job step (1 outside SLURM, or in a batch script: there
    SLURM_NTASKS describes the allocation, not processes that are running)."""
    env = os.environ
    if "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:  # srun sets SLURM_STEP_ID for its tasks
        return 1
    n = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
    return int(n) if n.isdigit() else 1


def _slurm_hostnames() -> list[str]:
    """The job's node names in order (``scontrol show hostnames``; this node if unavailable)."""
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    if nodes:
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.split()
        except (OSError, subprocess.SubprocessError):
            pass
        if "[" not in nodes:
            return nodes.split(",")
    return [os.environ.get("SLURMD_NODENAME") or os.uname().nodename]


def _slurm_first_host() -> str:
    return _slurm_hostnames()[0]


def _ddp_env_from_slurm() -> None:
    env = os.environ
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = str(slurm_step_tasks())
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    per_node = _expand_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1"),
                                      int(env.get("SLURM_NODEID", "0")) + 1)
    env["LOCAL_WORLD_SIZE"] = str(per_node[int(env.get("SLURM_NODEID", "0"))])
    env.setdefault("MASTER_ADDR", _slurm_first_host())
    env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000))


# ----------------------------------------------------------------------------- Horovod
class HorovodEngine(Engine):
    """horovod.torch: DistributedOptimizer (gradient averaging), broadcast of parameters and
    optimiser state from rank 0; rank 0 writes checkpoints and logs."""

    name = "horovod"

    def __init__(self, device: str = "auto"):
        try:
            import horovod.torch as hvd
        except ImportError as exc:
            raise ConfigError(f"engine horovod: horovod.torch cannot be imported ({exc}); "
                              "install it with scripts/install_horovod.sh") from None
        _horovod_gloo_bootstrap_from_slurm(hvd)
        hvd.init()
        self.hvd = hvd
        self.rank = hvd.rank()
        self.world_size = hvd.size()
        self.local_rank = hvd.local_rank()
        self.local_size = hvd.local_size()
        ntasks = slurm_step_tasks()
        if self.world_size == 1 and ntasks > 1:
            raise ConfigError(f"engine horovod: srun started {ntasks} tasks but Horovod sees one rank; "
                              "use horovodrun, or an MPI build of Horovod with srun --mpi=pmix")
        self.device = pick_device(device, self.local_rank, "network.device")
        if self.device.type == "cpu":
            _share_cpu_threads(self.local_size)

    def wrap_optimizer(self, optimizer, model, accumulate: int):
        return self.hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                             op=self.hvd.Average, backward_passes_per_step=int(accumulate))

    def broadcast_state(self, model, optimizer) -> None:
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        # A fresh optimiser has no state, and hvd.broadcast_optimizer_state would create it by
        # taking one step with zero gradients — which moves the weights (weight decay) and
        # advances Adam's step count. Every rank built the same fresh optimiser, so only a
        # resumed (non-empty) state is broadcast.
        if optimizer.state_dict()["state"]:
            self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    def optimizer_step(self, optimizer, scaler=None, clip_grad: float = 0.0, parameters=None) -> None:
        if scaler is None and clip_grad <= 0:
            optimizer.step()
            return
        optimizer.synchronize()  # gradients averaged now; step must not all-reduce again
        if scaler is not None:
            scaler.unscale_(optimizer)
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(list(parameters), clip_grad)
        with optimizer.skip_synchronize():
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()

    def all_sum(self, values) -> np.ndarray:
        t = torch.as_tensor(np.asarray(values, dtype=np.float64))
        return self.hvd.allreduce(t, op=self.hvd.Sum, name=None).numpy()

    def average_buffers(self, model) -> None:
        for name, b in model.named_buffers():
            if b.is_floating_point():
                b.copy_(self.hvd.allreduce(b.detach().cpu(), op=self.hvd.Average, name=f"buf.{name}").to(b.device))

    def broadcast_object(self, obj):
        return self.hvd.broadcast_object(obj, root_rank=0)

    def barrier(self) -> None:
        self.hvd.barrier()

    def close(self) -> None:
        self.hvd.shutdown()


def _horovod_gloo_bootstrap_from_slurm(hvd) -> None:
    """Let ``srun`` start a gloo-only Horovod job without horovodrun.

    horovodrun normally runs a rendezvous HTTP server and passes each rank its place in
    HOROVOD_* variables. Under srun (a job step with several tasks, no HOROVOD_RANK, no MPI
    in this Horovod build) rank 0 starts the same server (horovod.runner's
    RendezvousServer) on MASTER_ADDR:HOROVOD_GLOO_RENDEZVOUS_PORT and every rank sets the
    variables from SLURM's. Nothing happens outside SLURM or under horovodrun/MPI.
    """
    env = os.environ
    ntasks = slurm_step_tasks()
    if ntasks <= 1 or "HOROVOD_RANK" in env:
        return
    if hvd.mpi_built() and any(k in env for k in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")):
        return  # srun --mpi=pmix with an MPI build: Horovod initialises through MPI
    rank = int(env["SLURM_PROCID"])
    local_rank = int(env.get("SLURM_LOCALID", "0"))
    host = env.get("SLURMD_NODENAME") or os.uname().nodename
    # Hosts and slots, without a communicator: from SLURM's task layout.
    nodes = _slurm_hostnames()
    per_node = _expand_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", str(ntasks)),
                                      len(nodes))
    addr = env.get("MASTER_ADDR") or nodes[0]
    port = int(env.get("HOROVOD_GLOO_RENDEZVOUS_PORT", 29400 + int(env.get("SLURM_JOB_ID", "0")) % 1000))
    node_index = nodes.index(host) if host in nodes else int(env.get("SLURM_NODEID", "0"))
    if rank == 0:
        from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
        from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer
        from horovod.runner.util.threads import in_thread

        hosts = parse_hosts(",".join(f"{h}:{n}" for h, n in zip(nodes, per_node)))
        httpd = RendezvousHTTPServer(("", port), RendezvousHandler, 0)
        in_thread(target=httpd.serve_forever)
        httpd.init(get_host_assignments(hosts, ntasks))
        _RENDEZVOUS.append(httpd)  # keep it alive for the job
    iface = env.get("HOROVOD_GLOO_IFACE") or _iface_towards(addr, port)
    env.update({
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": addr, "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
        "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo", "HOROVOD_GLOO_IFACE": iface,
        "HOROVOD_RANK": str(rank), "HOROVOD_SIZE": str(ntasks),
        "HOROVOD_LOCAL_RANK": str(local_rank), "HOROVOD_LOCAL_SIZE": str(per_node[node_index]),
        "HOROVOD_CROSS_RANK": str(node_index), "HOROVOD_CROSS_SIZE": str(len(nodes)),
        "HOROVOD_HOSTNAME": nodes[node_index],
    })


_RENDEZVOUS: list = []


def _iface_towards(addr: str, port: int) -> str:
    """Name of the network interface whose IPv4 address routes to ``addr``."""
    import socket

    import psutil

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((addr, port))
            ip = s.getsockname()[0]
    except OSError:
        return "lo"
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    return "lo"


def _expand_tasks_per_node(spec: str, n_nodes: int) -> list[int]:
    """SLURM_TASKS_PER_NODE ``"2(x3),1"`` → [2, 2, 2, 1]."""
    out: list[int] = []
    for part in spec.split(","):
        if "(x" in part:
            n, rep = part.split("(x")
            out += [int(n)] * int(rep.rstrip(")"))
        elif part:
            out.append(int(part))
    if len(out) < n_nodes:
        out += [out[-1] if out else 1] * (n_nodes - len(out))
    return out[:n_nodes]


# ----------------------------------------------------------------------------- factory
def detect_engine() -> str:
    env = os.environ
    if "HOROVOD_RANK" in env:
        return "horovod"
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env):
        return "ddp"
    if any(k in env for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK")) or slurm_step_tasks() > 1:
        try:  # mpirun / srun with several tasks: Horovod if it is installed, else DDP over srun
            import horovod.torch  # noqa: F401
            return "horovod"
        except ImportError:
            return "ddp" if slurm_step_tasks() > 1 else "single"
    return "single"


def make_engine(name: str = "auto", device: str = "auto", backend: str | None = None) -> Engine:
    """Create the engine ``name`` (``auto``: from how the process was launched)."""
    if name not in ENGINES:
        raise ConfigError(f"network.engine must be one of {ENGINES}, got {name!r}")
    if name == "auto":
        name = detect_engine()
    if name == "single":
        return Engine(device)
    if name == "ddp":
        return DDPEngine(device, backend)
    return HorovodEngine(device)
