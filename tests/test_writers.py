import numpy as np

from amortize.writers import NullWriter, TensorboardWriter


def test_tensorboard_writer_writes_events(tmp_path):
    writer = TensorboardWriter(tmp_path)
    writer.scalars({"train/loss": 1.5}, 1)
    writer.image("preview", np.zeros((8, 8, 3), np.uint8), 1)
    writer.histogram("radius", np.array([1.0, 2.0, 3.0]), 1)
    writer.histogram("empty", np.array([]), 1)  # nothing to draw is not an error
    writer.close()
    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_null_writer_accepts_everything():
    writer = NullWriter()
    writer.scalars({"a": 1.0}, 0)
    writer.image("x", np.zeros((2, 2, 3)), 0)
    writer.histogram("h", np.ones(3), 0)
    writer.close()
