"""The vanilla (Elman) RNN written from the lecture notes' equations.

    h_t = tanh(W_hh h_{t-1} + W_xh x_t + b)

Stacked layers with dropout between them, state passed explicitly. For export it
lowers itself to `nn.RNN` with the same weights (ONNX has a matching RNN op); the
export's verification checks that the two agree.
"""

from __future__ import annotations

import torch
from torch import nn


class ElmanRNN(nn.Module):
    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 dropout: float = 0.0):  # fmt: skip
        super().__init__()
        self.hidden_size, self.num_layers, self.dropout = hidden_size, num_layers, dropout
        sizes = [input_size] + [hidden_size] * (num_layers - 1)
        self.w_xh = nn.ModuleList(nn.Linear(n, hidden_size) for n in sizes)  # W_xh, b
        self.w_hh = nn.ModuleList(nn.Linear(hidden_size, hidden_size, bias=False)
                                  for _ in sizes)  # fmt: skip
        bound = hidden_size**-0.5
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [B, T, I]; h0: [L, B, H] -> y: [B, T, H] (last layer), h: [L, B, H]
        finals = []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout and self.training:
                x = nn.functional.dropout(x, self.dropout)
            xw = self.w_xh[layer](x)  # W_xh x_t + b for every t at once: [B, T, H]
            h, outputs = h0[layer], []
            for t in range(x.size(1)):
                h = torch.tanh(self.w_hh[layer](h) + xw[:, t])  # [B, H]
                outputs.append(h)
            x = torch.stack(outputs, 1)
            finals.append(h)
        return x, torch.stack(finals)

    def to_nn_rnn(self) -> nn.RNN:
        """The same function as torch's nn.RNN (tanh), for export."""
        rnn = nn.RNN(self.w_xh[0].in_features, self.hidden_size, self.num_layers,
                     batch_first=True)  # fmt: skip
        with torch.no_grad():
            for layer in range(self.num_layers):
                getattr(rnn, f"weight_ih_l{layer}").copy_(self.w_xh[layer].weight)
                getattr(rnn, f"bias_ih_l{layer}").copy_(self.w_xh[layer].bias)
                getattr(rnn, f"weight_hh_l{layer}").copy_(self.w_hh[layer].weight)
                getattr(rnn, f"bias_hh_l{layer}").zero_()
        return rnn.eval()
