import numpy as np

from conftest import SAMPLE, needs_sample
from helpers.data.images import list_images
from helpers.analysis.labels import class_labels, colour_label, highlight_sets, hue_name


def test_class_labels_from_known_classes():
    classes = [1, 5, 160, 200, 250, 500, 900, 152, -1]  # fish, fish, dogs ..., objects, unknown
    top = np.array([[2, 3, 4, 7, -1], [0, 1, 2, 3, -1], [5, 6, 8, 0, 1], [8, -1, -1, -1, -1]])
    labels = class_labels(top, classes)
    assert labels[0]["labels"] == {"animal": 1.0, "dog": 1.0} and labels[0]["top_class"] in (160, 200, 250, 152)
    assert labels[1]["animal"] == 1.0 and labels[1]["dog"] == 0.5 and labels[1]["labels"] == {"animal": 1.0}
    assert labels[2]["labels"] == {} and labels[2]["animal"] == 0.5  # unknown class ignored: 2 of 4 labelled
    assert labels[3] == {"labelled": 0, "labels": {}}


def test_colour_names():
    assert hue_name((230, 20, 20))[0] == "red" and hue_name((20, 40, 220))[0] == "blue"
    assert hue_name((30, 200, 40))[0] == "green" and hue_name((250, 220, 20))[0] == "yellow"
    assert hue_name((128, 128, 128))[0] is None and hue_name((10, 5, 5))[0] is None  # grey, dark
    assert colour_label([(230, 20, 20), (200, 10, 30), (250, 40, 40), (30, 200, 40)]) == {"red": 0.75}
    assert colour_label([(230, 20, 20), (20, 40, 220)]) == {}


def test_highlight_sets():
    labels = [{"labels": {"animal": 1.0}}, {"labels": {"animal": 0.8, "dog": 0.8}}, {"labels": {"red": 0.9}},
              {"labels": {}}]
    assert highlight_sets(labels) == {"animal": [0, 1], "dog": [1], "colour: red": [2]}


@needs_sample
def test_labels_of_real_sample_images():
    """The sample's file names give the truth: features whose top images are its dog photos are dogs."""
    images = list_images(SAMPLE)
    classes = np.array(images.classes)
    dogs = np.flatnonzero((classes >= 151) & (classes <= 268))[:8]
    things = np.flatnonzero(classes >= 398)[:8]
    labels = class_labels(np.stack([dogs, things]), classes)
    assert labels[0]["labels"] == {"animal": 1.0, "dog": 1.0}
    assert labels[1]["labels"] == {} and labels[1]["animal"] == 0.0


def test_colour_labels_of_generated_coloured_patches():
    """Images with a saturated square on grey: the label read around the patch's cells is its colour."""
    from helpers.analysis.examples import cell_colours

    for rgb, name in [((220, 30, 30), "red"), ((40, 60, 230), "blue"), ((40, 200, 60), "green")]:
        image = np.full((224, 224, 3), 128, np.uint8)
        image[64:128, 96:160] = rgb  # cells y 4-7, x 6-9
        colours = cell_colours(image)
        around = [colours[y, x] for y, x in [(5, 7), (6, 8), (5, 8), (6, 7)]]
        assert colour_label(around) == {name: 1.0}
        assert colour_label([colours[12, 1]] * 4) == {}  # the grey background has no colour
