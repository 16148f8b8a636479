#!/usr/bin/env python3
"""What nvcc made of the CUDA kernels, per kernel, from the SASS of one architecture.

For each kernel of the sm_90 (or ``--arch``) code it reports registers, stack and
local memory, spill stores/loads, static shared memory, instruction counts (all,
FFMA, DFMA, tensor-core MMA) and the 32-bit integer divisions nvcc expanded inline,
as a Markdown table (benchmarks/results/sass-sm90.md is one).

Where the SASS comes from:
  default       the built extension, ``cae_kernels/_C*.so`` compiled by nvcc
                (``pip install -e .`` with a CUDA toolkit; ``--so`` names another)
  --compile     compiles ``csrc/cuda/*.cu`` for ``--arch`` alone, one file at a time,
                with the extension's nvcc flags (setup.py) plus ``-Xptxas -v``, which
                adds ptxas's own spill counts; ``--build-dir`` keeps the cubins and
                reuses them while the sources and the command are unchanged
  --res-usage FILE --sass FILE   the saved output of ``cuobjdump -res-usage`` and
                ``cuobjdump -sass`` (and, optionally, ``--ptxas-log`` of ptxas -v)

``--check`` exits 1 when a kernel uses local memory (spills: STL/LDL instructions,
a stack frame, local bytes, or ptxas's spill counts) or when a kernel whose name says
it is a tensor-core kernel (``mma``, ``wmma``, ``wgmma``, ``tensor_core`` or
``tc`` as a word of its name) has no tensor-core instruction (HMMA, IMMA, DMMA,
BMMA, HGMMA, ...). ``--allow-local FILE`` names the kernels known to use local memory
today (``--write-allow-local`` writes the list), which then pass: only a new one fails.
Without ptxas's counts (a built extension) a spill and an array kept in local memory
look the same, so both count.

cuobjdump is looked for in $CUDA_HOME/bin, on PATH, then in NVIDIA's Python packages
(``pip install nvidia-cuda-cuobjdump``) and in triton's bundled copy (triton comes
with torch's CUDA wheels); ``--cuobjdump`` names one.
"""

import argparse
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Tensor-core instructions: Volta..Ada's warp-level MMA, Hopper's warpgroup MMA
# (xGMMA) and Blackwell's UTC*MMA.
TENSOR_CORE = re.compile(r"^(?:[HIDBQO]MMA|[HIQB]GMMA|UTC\w*MMA)$")
# A kernel whose name says it uses tensor cores.
MMA_NAME = re.compile(r"(?:^|[^a-z0-9])(?:w?g?mma|tensor_?core|tc)(?:$|[^a-z0-9])", re.IGNORECASE)
# nvcc's inline 32-bit integer division / modulo by a value unknown at compile time
# starts with a round-up conversion of the divisor (I2F.U32.RP, then MUFU.RCP).
INT_DIV_START = re.compile(r"^I2F(?:\.U32)?\.RP$")
INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


@dataclass
class Kernel:
    mangled: str
    name: str = ""
    registers: int | None = None
    stack: int | None = None
    local: int | None = None
    shared: int | None = None
    spill_stores: int | None = None  # bytes, from ptxas -v
    spill_loads: int | None = None
    opcodes: dict = field(default_factory=dict)  # full opcode (with modifiers) -> count

    def count(self, predicate):
        return sum(n for op, n in self.opcodes.items() if predicate(op))

    @property
    def instructions(self):
        return self.count(lambda op: op.split(".")[0] != "NOP")

    @property
    def ffma(self):
        return self.count(lambda op: op.split(".")[0] == "FFMA")

    @property
    def dfma(self):
        return self.count(lambda op: op.split(".")[0] == "DFMA")

    @property
    def tensor_core(self):
        return self.count(lambda op: TENSOR_CORE.match(op.split(".")[0]) is not None)

    @property
    def local_accesses(self):
        """STL/LDL instructions: local memory traffic (spills, or arrays in local memory)."""
        return self.count(lambda op: op.split(".")[0] in ("STL", "LDL"))

    @property
    def int_divisions(self):
        return self.count(lambda op: INT_DIV_START.match(op) is not None)

    @property
    def marked_mma(self):
        return MMA_NAME.search(self.name or self.mangled) is not None


# --- parsing cuobjdump / ptxas output ----------------------------------------------


def _by_function(text, header):
    """(function, line) for each line below a line that the regex ``header`` matches
    (its group 1 names the function), up to the next such line."""
    current = None
    for line in text.splitlines():
        m = re.search(header, line)
        if m:
            current = m.group(1)
        elif current is not None:
            yield current, line


def parse_res_usage(text, kernels=None):
    """``cuobjdump -res-usage``: ``Function <mangled>:`` then ``REG:n STACK:n SHARED:n LOCAL:n ...``."""
    kernels = {} if kernels is None else kernels
    for name, line in _by_function(text, r"^\s*Function\s+(\S+?):?\s*$"):
        if "REG:" in line:
            values = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            k = kernels.setdefault(name, Kernel(name))
            k.registers, k.stack = int(values.get("REG", 0)), int(values.get("STACK", 0))
            k.shared, k.local = int(values.get("SHARED", 0)), int(values.get("LOCAL", 0))
    return kernels


def parse_sass(text, kernels=None):
    """``cuobjdump -sass``: ``Function : <mangled>`` then one ``/*addr*/ OPCODE ...;`` per instruction."""
    kernels = {} if kernels is None else kernels
    seen = set()
    for name, line in _by_function(text, r"^\s*Function\s*:\s*(\S+)"):
        m = INSTRUCTION.search(line)
        if m:
            k = kernels.setdefault(name, Kernel(name))
            if name not in seen:  # the counts of this listing, not added to another's
                seen.add(name)
                k.opcodes = {}
            k.opcodes[m.group(1)] = k.opcodes.get(m.group(1), 0) + 1
    return kernels


def parse_ptxas_log(text, kernels):
    """``ptxas -v``: ``Function properties for <mangled>`` then ``... N bytes spill stores, N bytes
    spill loads``, for the ``kernels`` already found (ptxas also lists device functions)."""
    for name, line in _by_function(text, r"Function properties for (\S+)"):
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name in kernels:
            kernels[name].spill_stores, kernels[name].spill_loads = int(m.group(1)), int(m.group(2))
    return kernels


# --- names -------------------------------------------------------------------------

_SHORT_TYPES = [("c10::BFloat16", "bf16"), ("c10::Half", "half"), ("(bool)1", "true"), ("(bool)0", "false")]


def demangle(names):
    """Demangled names by c++filt where there is one; the mangled names otherwise."""
    names = list(names)
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return dict(zip(names, names, strict=True))
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, out.stdout.splitlines(), strict=True))


def shorten(name):
    """``void cae::cuda::k<c10::Half, float, 2>(cae::cuda::Args<c10::Half>)`` -> ``k<half, float, 2>``."""
    name = re.sub(r"^void\s+", "", name)
    depth = 0
    for i in range(len(name) - 1, -1, -1):  # drop the parameter list: the last top-level (...)
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0 and name[i] == "(":
            name = name[:i]
            break
    name = re.sub(r"\b(?:cae::cuda|cae)::", "", name)
    for long, short in _SHORT_TYPES:
        name = name.replace(long, short)
    return name


# --- report ------------------------------------------------------------------------


def local_memory(kernel):
    """How ``kernel`` uses local memory ("" if it does not): spills, or arrays placed there."""
    return ", ".join(f"{what} {n}" for what, n in (
        ("spill stores (bytes)", kernel.spill_stores), ("spill loads (bytes)", kernel.spill_loads),
        ("stack frame (bytes)", kernel.stack), ("local memory (bytes)", kernel.local),
        ("STL/LDL instructions", kernel.local_accesses)) if n)


def read_allowed(path):
    """Kernel names, one a line (``#`` starts a comment)."""
    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines())
    return {line for line in lines if line}


def problems(kernels, allowed_local=frozenset()):
    """What --check fails on, one line per finding; kernels in ``allowed_local`` may use
    local memory (the known ones, see --allow-local)."""
    found = []
    for k in kernels:
        label = k.name or k.mangled
        spills = local_memory(k)
        if spills and label not in allowed_local:
            found.append(f"{label}: uses local memory (spills): {spills}")
        if k.marked_mma and k.tensor_core == 0:
            found.append(f"{label}: named as a tensor-core kernel but has no tensor-core instruction")
    return found


def occupancy_warps(registers, block_threads=256, max_warps=64, registers_per_sm=65536):
    """Resident warps per SM that the registers allow (sm_90: 64K registers, 64 warps), whole
    blocks of ``block_threads``; registers are allocated per warp in units of 256."""
    per_warp = -(-registers * 32 // 256) * 256
    warps = min(max_warps, registers_per_sm // max(per_warp, 1))
    block_warps = block_threads // 32
    return warps // block_warps * block_warps


def _cell(value):
    return "-" if value is None else str(value)


def markdown_table(kernels):
    has_ptxas = any(k.spill_stores is not None for k in kernels)
    head = ["kernel", "registers", "warps/SM by registers", "stack B", "local B", "STL/LDL"]
    head += ["spill st/ld B"] if has_ptxas else []
    head += ["shared B", "instructions", "FFMA", "DFMA", "tensor-core", "int div"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in kernels:
        cells = [f"`{k.name or k.mangled}`", _cell(k.registers),
                 _cell(occupancy_warps(k.registers) if k.registers is not None else None),
                 _cell(k.stack), _cell(k.local), str(k.local_accesses)]
        if has_ptxas:
            cells.append(f"{_cell(k.spill_stores)}/{_cell(k.spill_loads)}")
        cells += [_cell(k.shared), str(k.instructions), str(k.ffma), str(k.dfma), str(k.tensor_core),
                  str(k.int_divisions)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


COLUMNS = """\
Columns: registers per thread (`cuobjdump -res-usage` REG); the warps per SM those
registers allow at 256-thread blocks (of 64 on sm_90; other limits not counted);
stack frame and local memory bytes (STACK, LOCAL); STL/LDL, the local-memory store and
load instructions in the SASS (spills, or arrays placed in local memory);{spill}
shared memory as cuobjdump gives it (SHARED: static only, dynamic shared memory is sized at
launch; on sm_80 and later a kernel that uses shared memory also shows the 1 KiB per block
the system reserves); instructions in the SASS (NOPs not counted); FFMA and DFMA; tensor-core
instructions (HMMA, IMMA, DMMA, BMMA, HGMMA, ...); int div: inline 32-bit integer
division/modulo sequences by a divisor unknown at compile time (each starts with
I2F.U32.RP; a `/` and a `%` of the same operands share one; 64-bit divisions, which call
a subroutine, are not counted).
"""


def summary(kernels):
    """A few lines of totals over the kernels."""
    if not kernels:
        return "No kernels found.\n"
    registers = [k.registers for k in kernels if k.registers is not None]
    local = [k for k in kernels if local_memory(k)]
    lines = [f"- {len(kernels)} kernels; registers per thread {min(registers)} to {max(registers)}, "
             f"{sum(r > 64 for r in registers)} above 64 (fewer than 32 of 64 warps per SM)."
             if registers else f"- {len(kernels)} kernels."]
    if any(k.spill_stores is not None for k in kernels):
        spilling = [k for k in kernels if k.spill_stores or k.spill_loads]
        lines.append(f"- {len(local)} use local memory; {len(spilling)} of them spill registers (ptxas -v), "
                     f"the others keep arrays there.")
    else:
        lines.append(f"- {len(local)} use local memory (spills or arrays; ptxas's spill counts need --compile).")
    mma = sum(k.tensor_core for k in kernels)
    lines.append(f"- {mma} tensor-core instructions in all; {sum(k.ffma for k in kernels)} FFMA, "
                 f"{sum(k.dfma for k in kernels)} DFMA.")
    return "\n".join(lines) + "\n"


def report(kernels, source, command=None):
    spill = ("\nspill st/ld: ptxas -v's spill stores and loads in bytes;"
             if any(k.spill_stores is not None for k in kernels) else "")
    made = f"Made by `{command}`.\n" if command else ""
    return (f"{made}{source}\n\n{summary(kernels)}\n{COLUMNS.format(spill=spill)}\n"
            f"{markdown_table(kernels)}")


# --- running the tools --------------------------------------------------------------


def find_cuobjdump(explicit=None):
    if explicit:
        return explicit
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "bin" / "cuobjdump")
    on_path = shutil.which("cuobjdump")
    if on_path:
        candidates.append(Path(on_path))
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        candidates += [Path(p) for p in sorted(glob.glob(os.path.join(site, "nvidia", "*", "bin", "cuobjdump")))]
        candidates.append(Path(site) / "triton" / "backends" / "nvidia" / "bin" / "cuobjdump")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    sys.exit("sass_report: no cuobjdump found in $CUDA_HOME/bin, on PATH or in NVIDIA's Python packages; "
             "`pip install nvidia-cuda-cuobjdump` (or triton) provides one, or pass --cuobjdump")


def find_nvcc():
    for candidate in ([Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"] if os.environ.get("CUDA_HOME") else []):
        if candidate.is_file():
            return str(candidate)
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path
    sys.exit("sass_report: --compile needs nvcc: set CUDA_HOME or put nvcc on PATH")


def find_extension():
    built = sorted(glob.glob(str(ROOT / "cae_kernels" / "_C*.so")))
    if built:
        return built[0]
    import importlib.util

    spec = importlib.util.find_spec("cae_kernels._C")
    if spec is None or not spec.origin:
        sys.exit("sass_report: no built cae_kernels/_C*.so: build it with CUDA, or use --compile")
    return spec.origin


def cuobjdump(tool, *args):
    return subprocess.run([tool, *args], capture_output=True, text=True, check=True).stdout


def tool_version(tool):
    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    lines = [line for line in out.splitlines() if "release" in line]
    return lines[-1].strip() if lines else "unknown version"


def nvcc_flags(arch):
    """The flags of the extension's nvcc build (setup.py, and torch's for every extension),
    for one architecture, plus -Xptxas -v."""
    import torch.utils.cpp_extension as cpp_extension

    includes = cpp_extension.include_paths(device_type="cuda")
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        includes += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    flags = ["-cubin", f"-arch={arch}", "-O3", "--expt-relaxed-constexpr", "-lineinfo", "-std=c++20",
             "-Xptxas", "-v", "-DCAE_WITH_CUDA", "-DCAE_CPU_PORTABLE_BUILD", "-DTORCH_API_INCLUDE_EXTENSION_H",
             "-DTORCH_EXTENSION_NAME=_C"]
    flags += [f for f in cpp_extension.COMMON_NVCC_FLAGS if f not in flags]
    return flags + [f"-I{p}" for p in dict.fromkeys(includes)] + [f"-I{ROOT / 'csrc'}"]


def compile_cubins(arch, build_dir):
    """csrc/cuda/*.cu -> one cubin each (and ptxas's log); reuses an unchanged one."""
    nvcc = find_nvcc()
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    digest = hashlib.sha256()
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.suffix in (".cu", ".cuh", ".h") and "sim" not in path.parts:
            digest.update(path.read_bytes())
    cubins, logs = [], []
    for cu in sources:
        cubin, log, stamp = (build_dir / f"{cu.stem}.{ext}" for ext in ("cubin", "ptxas.log", "stamp"))
        command = [nvcc, *nvcc_flags(arch), str(cu), "-o", str(cubin)]
        key = hashlib.sha256(digest.digest() + "\0".join(command).encode()).hexdigest()
        if not (cubin.is_file() and log.is_file() and stamp.is_file() and stamp.read_text() == key):
            print(f"sass_report: nvcc {cu.name} for {arch}", file=sys.stderr, flush=True)
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"sass_report: nvcc failed on {cu.name}:\n{done.stderr}")
            log.write_text(done.stdout + done.stderr)
            stamp.write_text(key)
        cubins.append(str(cubin))
        logs.append(log.read_text())
    return cubins, "\n".join(logs), tool_version(nvcc)


def collect(args):
    """(kernels, a line saying where they come from)."""
    arch = args.arch
    if args.res_usage or args.sass:
        if not (args.res_usage and args.sass):
            sys.exit("sass_report: --res-usage and --sass go together")
        kernels = parse_res_usage(Path(args.res_usage).read_text())
        parse_sass(Path(args.sass).read_text(), kernels)
        if args.ptxas_log:
            parse_ptxas_log(Path(args.ptxas_log).read_text(), kernels)
        return kernels, f"From saved cuobjdump output: {args.res_usage}, {args.sass}."
    tool = find_cuobjdump(args.cuobjdump)
    if args.compile:
        if args.build_dir:
            binaries, ptxas_log, nvcc = compile_cubins(arch, Path(args.build_dir))
        else:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                binaries, ptxas_log, nvcc = compile_cubins(arch, Path(tmp))
                return _dump(tool, binaries, arch, ptxas_log), _source(arch, nvcc, tool, "compiled csrc/cuda/*.cu")
        return _dump(tool, binaries, arch, ptxas_log), _source(arch, nvcc, tool, "compiled csrc/cuda/*.cu")
    so = args.so or find_extension()
    kernels = _dump(tool, [so], arch, "")
    if not kernels:
        sys.exit(f"sass_report: {so} holds no {arch} code (built without CUDA, or for other architectures)")
    return kernels, _source(arch, None, tool, f"the built extension {Path(so).name}")


def _dump(tool, binaries, arch, ptxas_log):
    kernels = {}
    for binary in binaries:
        parse_res_usage(cuobjdump(tool, "-res-usage", "-arch", arch, binary), kernels)
        parse_sass(cuobjdump(tool, "-sass", "-arch", arch, binary), kernels)
    parse_ptxas_log(ptxas_log, kernels)
    return kernels


def _source(arch, nvcc, tool, what):
    made = f"nvcc: {nvcc}; " if nvcc else ""
    return f"SASS for {arch} of {what} ({made}cuobjdump: {tool_version(tool)})."


# Options that only say where files go: left out of the command a report names.
_WHERE = ("--so", "--build-dir", "-o", "--output", "--header", "--write-allow-local", "--allow-local", "--cuobjdump")


def _command(argv):
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _WHERE:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in _WHERE)):
            kept.append(arg)
    return " ".join(["python scripts/sass_report.py", *kept])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sm_90", help="the architecture whose SASS to read (default sm_90)")
    parser.add_argument("--so", help="the built extension (default: cae_kernels/_C*.so)")
    parser.add_argument("--compile", action="store_true", help="compile csrc/cuda/*.cu for --arch with nvcc")
    parser.add_argument("--build-dir", help="with --compile: keep (and reuse) the cubins here")
    parser.add_argument("--res-usage", help="saved `cuobjdump -res-usage` output")
    parser.add_argument("--sass", help="saved `cuobjdump -sass` output")
    parser.add_argument("--ptxas-log", help="saved `ptxas -v` output (with --res-usage/--sass)")
    parser.add_argument("--cuobjdump", help="the cuobjdump to run")
    parser.add_argument("--header", help="Markdown to put above the table (a file)")
    parser.add_argument("-o", "--output", help="write the report here (default: stdout)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on a spill or on a tensor-core kernel without tensor-core instructions")
    parser.add_argument("--allow-local", metavar="FILE",
                        help="with --check: kernels (names as in the report, one a line) known to use "
                             "local memory, which do not fail the check")
    parser.add_argument("--write-allow-local", metavar="FILE",
                        help="write the kernels that use local memory, as --allow-local reads them")
    args = parser.parse_args(argv)

    found, source = collect(args)
    names = demangle(found)
    for k in found.values():
        k.name = shorten(names[k.mangled])
    kernels = sorted(found.values(), key=lambda k: k.name)
    text = report(kernels, source, _command(argv if argv is not None else sys.argv[1:]))
    if args.header:
        text = Path(args.header).read_text().rstrip("\n") + "\n\n" + text
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    if args.write_allow_local:
        Path(args.write_allow_local).write_text(
            f"# Kernels of the {args.arch} build that use local memory (spills, or arrays placed in local\n"
            "# memory), written by scripts/sass_report.py --write-allow-local: `--check --allow-local` lets\n"
            "# these pass and fails on any other. Fixing one: delete its line.\n"
            + "".join(f"{k.name}\n" for k in kernels if local_memory(k)))
    if args.check:
        allowed = read_allowed(args.allow_local) if args.allow_local else frozenset()
        failures = problems(kernels, allowed)
        for line in failures:
            print(f"sass_report --check: {line}", file=sys.stderr)
        known = sum(1 for k in kernels if local_memory(k) and k.name in allowed)
        print(f"sass_report --check: {len(kernels)} kernels, {len(failures)} problems"
              f"{f', {known} known to use local memory (--allow-local)' if allowed else ''}", file=sys.stderr)
        return 1 if failures else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
