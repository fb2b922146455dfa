"""The OpenMM engine: real molecular dynamics. Deserializes the target's
system.xml / integrator.xml and the stream's state.xml, runs
`steps_per_frame` steps per frame, sends each frame as XTC (simulation time
in the frame, so readers see time increase) and checkpoints as state.xml.

Periodic systems are wrapped into their box and the box goes into each
frame; a non-periodic one (implicit solvent, vacuum) gets neither: its
coordinates are the simulation's own and the XTC carries no unit cell.

Each activation draws a fresh random seed for the integrator (the target's
integrator.xml holds one fixed seed, so every stream and every restart
would replay the same noise). The first frame of an activation carries it
in SEED_FILE, one line `step <step> seed <seed>`; frames files are
concatenated on download, so `seeds.txt` of a stream lists the seed of
every committed activation and the step it started from.

OpenMM and mdtraj are imported lazily so the synthetic engine works
without them."""
import os
import shutil
import tempfile

NAME = 'openmm'
FRAME_FILE = 'frames.xtc.b64'
STATE_FILE = 'state.xml.gz.b64'
SYSTEM_FILE = 'system.xml.gz.b64'
INTEGRATOR_FILE = 'integrator.xml.gz.b64'
SEED_FILE = 'seeds.txt.b64'
PREFERRED = ('CUDA', 'OpenCL', 'CPU', 'Reference')


def version():
    import openmm
    return '.'.join(openmm.__version__.split('.')[:2])


def platforms():
    """Names of the OpenMM platforms present on this machine."""
    import openmm
    return [openmm.Platform.getPlatform(i).getName()
            for i in range(openmm.Platform.getNumPlatforms())]


def pick_platform(name=None):
    """The named platform, else the fastest present (CUDA, OpenCL, CPU)."""
    present = platforms()
    if name:
        if name not in present:
            raise ValueError('OpenMM platform %s not available (have %s)'
                             % (name, ', '.join(present)))
        return name
    return next(p for p in PREFERRED if p in present)


def new_seed():
    """A random integrator seed in 1..2**31-1 (0 would let OpenMM pick one
    it does not report)."""
    return int.from_bytes(os.urandom(4), 'big') % (2 ** 31 - 1) + 1


def read_seeds(text):
    """[(step, seed)] of a stream's downloaded seeds.txt."""
    out = []
    for line in text.splitlines():
        words = line.split()
        if len(words) == 4 and words[0] == 'step' and words[2] == 'seed':
            out.append((int(words[1]), int(words[3])))
    return out


class Engine:
    """Process-wide settings: platform (default: best present; the demo and
    tests pass CPU) and CPU threads per core."""

    name = NAME

    def __init__(self, platform=None, threads=None):
        self.platform = pick_platform(platform)
        self.threads = threads
        self.version = version()

    def start(self, stream_files, target_files, options):
        return Run(self, stream_files, target_files, options)


class Run:
    def __init__(self, engine, stream_files, target_files, options):
        import openmm
        from mdtraj.formats import XTCTrajectoryFile
        self.openmm = openmm
        self.xtc_file = XTCTrajectoryFile
        for name, where in ((SYSTEM_FILE, target_files),
                            (INTEGRATOR_FILE, target_files),
                            (STATE_FILE, stream_files)):
            if name not in where:
                raise ValueError('openmm: missing file %s' % name)
        try:
            self.steps_per_frame = int(options.get('steps_per_frame', 0))
        except (TypeError, ValueError):
            self.steps_per_frame = 0
        if self.steps_per_frame < 1:
            raise ValueError('openmm: options.steps_per_frame must be an '
                             'integer >= 1')
        des = openmm.XmlSerializer.deserialize
        system = des(target_files[SYSTEM_FILE].decode())
        self.integrator = des(target_files[INTEGRATOR_FILE].decode())
        self.seed = new_seed()
        if hasattr(self.integrator, 'setRandomNumberSeed'):
            self.integrator.setRandomNumberSeed(self.seed)
        else:
            self.seed = None    # a deterministic integrator: nothing drawn
        self.periodic = system.usesPeriodicBoundaryConditions()
        state = des(stream_files[STATE_FILE].decode())
        platform = openmm.Platform.getPlatformByName(engine.platform)
        properties = {}
        if engine.threads and engine.platform == 'CPU':
            properties['Threads'] = str(engine.threads)
        self.context = openmm.Context(system, self.integrator, platform,
                                      properties)
        self.context.setState(state)
        self.step = int(round(state.getStepCount())) \
            if hasattr(state, 'getStepCount') else 0
        self.first_step: int | None = self.step
        self.tmp = tempfile.mkdtemp(prefix='siegetank-openmm-')

    def next_frame(self, stop):
        """Run one frame; returns ({name: XTC bytes}, 1), None if stopped
        before starting it."""
        if stop.is_set():
            return None
        self.integrator.step(self.steps_per_frame)
        self.step += self.steps_per_frame
        state = self.context.getState(getPositions=True,
                                      enforcePeriodicBox=self.periodic)
        files = {FRAME_FILE: self._xtc(state)}
        if self.seed is not None and self.first_step is not None:
            files[SEED_FILE] = ('step %d seed %d\n' % (
                self.first_step, self.seed)).encode()
            self.first_step = None
        return files, 1

    def _xtc(self, state):
        import numpy as np
        from openmm import unit
        xyz = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        box = None
        if self.periodic:
            box = np.asarray([state.getPeriodicBoxVectors(asNumpy=True)
                              .value_in_unit(unit.nanometer)],
                             dtype=np.float32)
        time_ps = state.getTime().value_in_unit(unit.picosecond)
        path = os.path.join(self.tmp, 'frame.xtc')
        with self.xtc_file(path, 'w') as f:
            f.write(np.asarray([xyz], dtype=np.float32),
                    time=np.asarray([time_ps], dtype=np.float32),
                    step=np.asarray([self.step], dtype=np.int32),
                    box=box)
        with open(path, 'rb') as f:
            return f.read()

    def checkpoint(self):
        state = self.context.getState(getPositions=True, getVelocities=True,
                                      getParameters=True,
                                      getIntegratorParameters=True)
        return {STATE_FILE: self.openmm.XmlSerializer.serialize(state)
                .encode()}

    def close(self):
        shutil.rmtree(self.tmp, ignore_errors=True)
        del self.context
