"""The LSTM that reads an image row by row (``jaxlight.models.rnn``)."""

from __future__ import annotations

from torch import nn

__all__ = ["LSTMClassifier"]


class LSTMClassifier(nn.Module):
    """The image read as 28 rows of 28 pixels by ``nn.LSTM(28, 128)``; logits from the last
    hidden state."""

    def __init__(self, in_features: int = 28, hidden: int = 128, num_classes: int = 10):
        super().__init__()
        self.input_shape = (28, in_features)
        self.lstm = nn.LSTM(in_features, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = x.reshape(x.shape[0], 28, -1)
        _, (h, _) = self.lstm(x)
        return self.fc(h[-1])
