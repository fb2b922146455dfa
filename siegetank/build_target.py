"""Build a real OpenMM target with OpenMM itself: alanine dipeptide (shipped
in siegetank/data, nothing downloaded) with the bundled amber14 force
field, solvated in a TIP3P water box (PME), or in implicit solvent (OBC2)
or vacuum (no cutoff, no box), minimized once, then N stream seeds that
differ only by their random initial velocities.

    python -m siegetank.build_target OUT_DIR --streams 4 [--solvent obc2]

writes OUT_DIR/system.xml, integrator.xml, topology.pdb (for trajectory
readers) and streams/<i>/state.xml. `upload()` turns such a folder into a
target with its streams through the manager client; topology.pdb goes up as
a target file too, which is where `Target.sync` finds the topology that
mdtraj needs to read the frames.
"""
import argparse
import json
import os
import sys

from siegetank.core import openmm_engine

HERE = os.path.dirname(os.path.abspath(__file__))
STRUCTURE = os.path.join(HERE, 'data', 'alanine-dipeptide.pdb')
TEMPERATURE = 300.0       # kelvin
STEP_FS = 2.0             # femtoseconds, with H-bond constraints
SOLVENTS = ('tip3p', 'obc2', 'vacuum')


def build(out, streams=4, padding_nm=1.0, steps_per_frame=100, seed=1,
          structure=STRUCTURE, solvent='tip3p'):
    """Write the target files and `streams` seeds under `out`; returns a
    summary dict (also written to out/target.json). `solvent`: 'tip3p'
    (explicit water, PME), 'obc2' (implicit) or 'vacuum'."""
    import openmm
    from openmm import app, unit

    if solvent not in SOLVENTS:
        raise ValueError('solvent must be one of %s' % ', '.join(SOLVENTS))
    pdb = app.PDBFile(structure)
    model = app.Modeller(pdb.topology, pdb.positions)
    if solvent == 'tip3p':
        ff = app.ForceField('amber14-all.xml', 'amber14/tip3p.xml')
        model.addSolvent(ff, model='tip3p',
                         padding=padding_nm * unit.nanometer,
                         neutralize=False)
        system = ff.createSystem(model.topology, nonbondedMethod=app.PME,
                                 nonbondedCutoff=0.9 * unit.nanometer,
                                 constraints=app.HBonds)
    else:
        ff = app.ForceField('amber14-all.xml', *(
            ['implicit/obc2.xml'] if solvent == 'obc2' else []))
        system = ff.createSystem(model.topology, nonbondedMethod=app.NoCutoff,
                                 constraints=app.HBonds)
    integrator = openmm.LangevinMiddleIntegrator(
        TEMPERATURE * unit.kelvin, 1.0 / unit.picosecond,
        STEP_FS * unit.femtoseconds)
    # The cores draw a fresh seed per activation (openmm_engine); this
    # one only serves who runs integrator.xml as is.
    integrator.setRandomNumberSeed(seed)
    platform = openmm.Platform.getPlatformByName(
        'CPU' if 'CPU' in openmm_engine.platforms() else 'Reference')
    context = openmm.Context(system, integrator, platform)
    context.setPositions(model.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 500)

    os.makedirs(out, exist_ok=True)
    _write(os.path.join(out, 'system.xml'),
           openmm.XmlSerializer.serialize(system))
    _write(os.path.join(out, 'integrator.xml'),
           openmm.XmlSerializer.serialize(integrator))
    minimized = context.getState(getPositions=True)
    with open(os.path.join(out, 'topology.pdb'), 'w') as f:
        app.PDBFile.writeFile(model.topology, minimized.getPositions(), f)
    for i in range(streams):
        context.setVelocitiesToTemperature(TEMPERATURE * unit.kelvin,
                                           seed * 1000 + i + 1)
        context.setTime(0.0)
        state = context.getState(getPositions=True, getVelocities=True,
                                 getParameters=True,
                                 enforcePeriodicBox=solvent == 'tip3p')
        folder = os.path.join(out, 'streams', str(i))
        os.makedirs(folder, exist_ok=True)
        _write(os.path.join(folder, 'state.xml'),
               openmm.XmlSerializer.serialize(state))
    summary = {'atoms': model.topology.getNumAtoms(),
               'waters': sum(1 for r in model.topology.residues()
                             if r.name == 'HOH'),
               'streams': streams, 'solvent': solvent,
               'options': {'steps_per_frame': steps_per_frame},
               'engine_versions': [engine_version()],
               'ps_per_frame': steps_per_frame * STEP_FS / 1000.0}
    _write(os.path.join(out, 'target.json'), json.dumps(summary, indent=1))
    return summary


def engine_version():
    """The engine version a core of this machine announces: OpenMM's
    major.minor (e.g. '8.6')."""
    return openmm_engine.version()


def _write(path, text):
    with open(path, 'w') as f:
        f.write(text)


def target_files(out):
    """{wire name: bytes} of the target files of a built folder (the
    engine's two, and the topology for readers of the frames)."""
    files = {}
    for name in ('system.xml', 'integrator.xml', 'topology.pdb'):
        with open(os.path.join(out, name), 'rb') as f:
            files[name + '.gz.b64'] = f.read()
    return files


def stream_seeds(out):
    """[{wire name: bytes}] of the stream seeds of a built folder, in order."""
    folder = os.path.join(out, 'streams')
    seeds = []
    for i in sorted(os.listdir(folder), key=int):
        with open(os.path.join(folder, i, 'state.xml'), 'rb') as f:
            seeds.append({'state.xml.gz.b64': f.read()})
    return seeds


def upload(client, out, description='alanine dipeptide in water',
           stage='private', allowed_ws=None, weight=1, stream_client=None):
    """Create a target from a built folder and add its streams (through
    `stream_client` if given, e.g. another CC host); returns (Target,
    [stream ids])."""
    with open(os.path.join(out, 'target.json')) as f:
        summary = json.load(f)
    target = client.add_target(options=summary['options'], engine='openmm',
                               engine_versions=summary['engine_versions'],
                               description=description, stage=stage,
                               files=target_files(out),
                               allowed_ws=allowed_ws, weight=weight)
    if stream_client is not None:
        target = stream_client.load_target(target.id)
    ids = [target.add_stream(seed) for seed in stream_seeds(out)]
    return target, ids


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m siegetank.build_target',
        description='Build an OpenMM target (alanine dipeptide in water) and '
                    'N stream seeds with different random velocities.')
    parser.add_argument('out', help='folder to write into')
    parser.add_argument('--streams', type=int, default=4)
    parser.add_argument('--padding', type=float, default=1.0,
                        help='water padding around the solute, nm')
    parser.add_argument('--steps-per-frame', type=int, default=100)
    parser.add_argument('--seed', type=int, default=1)
    parser.add_argument('--solvent', choices=SOLVENTS, default='tip3p')
    args = parser.parse_args(argv)
    if args.streams < 1 or args.steps_per_frame < 1:
        parser.error('--streams and --steps-per-frame must be >= 1')
    summary = build(args.out, args.streams, args.padding,
                    args.steps_per_frame, args.seed, solvent=args.solvent)
    print('%s: %d atoms (%d waters), %d streams, %g ps per frame' % (
        args.out, summary['atoms'], summary['waters'], summary['streams'],
        summary['ps_per_frame']))
    return 0


if __name__ == '__main__':
    sys.exit(main())
