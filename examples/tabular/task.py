"""A small MLP for the breast-cancer CSV files that make_data.py writes: 30 features, 2 classes."""

from torch import nn

classes = ["benign", "malignant"]  # label order: the names the CSV files hold, sorted
input_shape = (30,)  # one sample: a party holding no data (the split server) builds the model at once


def model(context):
    return nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 2))
