"""Ray Tune sweeps over any stage: search spaces, built-in experiments, the sweep driver and its report.

    python tune/sweep.py --stage pretrain --param lr=grid:1e-3,3e-3 --set max_steps=20
    python tune/sweep.py --experiment minimind-pretrain --scale 0.1
"""
