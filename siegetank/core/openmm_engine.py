"""The OpenMM engine: real molecular dynamics. Deserializes the target's
system.xml / integrator.xml and the stream's state.xml, runs
`steps_per_frame` steps per frame, sends each frame as XTC (simulation time
in the frame, so readers see time increase) and checkpoints as state.xml.

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
        self.tmp = tempfile.mkdtemp(prefix='siegetank-openmm-')

    def next_frame(self, stop):
        """Run one frame; returns ({name: XTC bytes}, 1), None if stopped
        before starting it."""
        if stop.is_set():
            return None
        self.integrator.step(self.steps_per_frame)
        self.step += self.steps_per_frame
        state = self.context.getState(getPositions=True,
                                      enforcePeriodicBox=True)
        return {FRAME_FILE: self._xtc(state)}, 1

    def _xtc(self, state):
        import numpy as np
        from openmm import unit
        xyz = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        box = state.getPeriodicBoxVectors(asNumpy=True) \
            .value_in_unit(unit.nanometer)
        time_ps = state.getTime().value_in_unit(unit.picosecond)
        path = os.path.join(self.tmp, 'frame.xtc')
        with self.xtc_file(path, 'w') as f:
            f.write(np.asarray([xyz], dtype=np.float32),
                    time=np.asarray([time_ps], dtype=np.float32),
                    step=np.asarray([self.step], dtype=np.int32),
                    box=np.asarray([box], dtype=np.float32))
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
