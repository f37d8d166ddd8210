"""Cars learn to recognise traffic signs by split learning: the camera-side layers stay in the car.

The seeds' automotive scenario: cars photograph traffic signs as they drive, and a shared model
should learn from all of them, but the camera images stay in the car. In split learning the
network is cut in two. Each car runs the first layers (two convolutional blocks, next to the
camera) on its own images and sends only what comes out of them, the activations at the cut
(32 x 8 x 8 numbers per image), with the labels. The server runs the rest of the network,
computes the loss and sends back the gradient at the cut, and the car updates its layers. The
cars take turns (vanilla split learning, SplitNN): the camera-side layers go from car to car
through the server, so every car starts from what the previous ones learned.

The data is GTSRB, the German traffic-sign benchmark (43 classes, 32x32 RGB; the built-in
``gtsrb`` task reads it from a directory). Its training images come in tracks of 30 photos of one
physical sign; every car holds whole tracks, dealt at random, so the cars hold different signs.
The test set is GTSRB's own (other physical signs). The baseline trains the same network
centrally on all cars' images pooled on the server, on as many examples as split learning saw.
The run ends by writing its HTML report into the run directory.

    python examples/traffic_signs.py [--rounds 8] [--cars 40] [--data-dir DIR] [--out DIR]

The data directory defaults to ``$SHOAL_GTSRB_DIR``, else ``../shared/data/gtsrb`` beside the
repository (see docs/scenarios.md, "Traffic signs in cars", for how to get the two files).
"""

import argparse
import os
from pathlib import Path

import shoal
from shoal.report import write_report

REPO = Path(__file__).resolve().parents[1]

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--rounds", type=int, default=8, help="rounds; each car takes one turn a round")
ap.add_argument("--cars", type=int, default=40, help="cars, each holding whole tracks")
ap.add_argument("--per-round", type=int, default=0,
                help="cars taking a turn each round (0: every car)")
ap.add_argument("--max-steps", type=int, default=0,
                help="most batches per car and turn (0: all of its images, one epoch)")
ap.add_argument("--data-dir", default=os.environ.get("SHOAL_GTSRB_DIR")
                or str(REPO.parent / "shared" / "data" / "gtsrb"),
                help="directory holding gtsrb32_train.npz and gtsrb32_test.npz")
ap.add_argument("--out", default="runs/traffic_signs", help="run directory (overwritten)")
args = ap.parse_args()

config = shoal.load_config(None, [
    "paradigm=split", "baseline=true", "seed=0",
    "task.name=gtsrb", f"task.data_dir='{args.data_dir}'", f"task.cars={args.cars}",
    "split.cut='pool2'",              # the car keeps conv1..pool2; the server holds the rest
    "split.schedule='vanilla'",
    f"federated.rounds={args.rounds}",
    f"federated.clients_per_round={args.per_round or args.cars}",
    "client.epochs=1", "client.batch_size=32", "client.lr=0.05",
    f"client.max_steps={args.max_steps}",
    "data.eval_fraction=0",           # every track trains; the test set is GTSRB's own
    "evaluation.central_every=1",
])
results = shoal.run_experiment(config, args.out, overwrite=True)
task = shoal.load_task("gtsrb", data_dir=args.data_dir, cars=args.cars)
print(task.description)

names = {"split": "split learning (camera side in the car)",
         "centralized": "centralized (images pooled on the server)"}
print(f"\nGTSRB test set ({len(task.test):,} images), after {args.rounds} rounds:")
print(f"  {'':<42} {'accuracy':>8} {'F1':>6} {'examples':>9} {'MB moved':>9} {'seconds':>8}")
for r in results:
    print(f"  {names[r.paradigm]:<42} {r.final['accuracy']:8.4f} {r.final['f1']:6.4f} "
          f"{r.examples:9,.0f} {r.bytes / 1e6:9.1f} {r.seconds:8.1f}")
split, central = results[0], results[1]
print(f"split learning vs centralized: {split.final['accuracy'] - central.final['accuracy']:+.4f} "
      "accuracy; no camera image left its car")
dcor = split.history[-1].get("leak/dcor")
if dcor is not None:  # what the server could still learn: activations are not anonymous
    print(f"distance correlation of the images with what left the cars: {dcor:.3f} (last "
          "round, per batch; 0: independent, 1: a copy; [split] activation_noise or "
          "nopeek_alpha lower it)")
print(f"report: {write_report(args.out).resolve()}")
