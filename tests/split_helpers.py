"""Running a model cut into Bottom / Trunk / Top in one process, and the unsplit model to compare with."""

from __future__ import annotations

from splitcore import positions_from_mask


def run_split(parts, input_ids, attention_mask, labels=None):
    bottom, trunk, top = parts
    hidden = bottom(input_ids, attention_mask)
    hidden = trunk(hidden, attention_mask)
    return top(hidden, attention_mask, labels=labels)


def full_forward(model, input_ids, attention_mask, labels=None):
    position_ids = positions_from_mask(attention_mask, input_ids.shape[1])
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels)


def split_backward(peft_parts, input_ids, attention_mask, labels):
    """Forward and backward across two cuts the way the network does it: detach, send, return the grad."""
    bottom, trunk, top = peft_parts
    sent_to_trunk = bottom(input_ids, attention_mask)
    trunk_input = sent_to_trunk.detach().requires_grad_(True)
    sent_to_top = trunk(trunk_input, attention_mask)
    top_input = sent_to_top.detach().requires_grad_(True)
    loss = top(top_input, attention_mask, labels=labels).loss
    loss.backward()
    sent_to_top.backward(top_input.grad)  # the gradient the client sends back to the trunk
    sent_to_trunk.backward(trunk_input.grad)  # the gradient the trunk sends back to the client
    return loss
