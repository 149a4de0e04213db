"""Privacy: the settings a job chooses, the defenses they switch on, and the leakage audit.

The threat model (docs/privacy.md): an honest-but-curious trunk owner who holds the public
base weights and sees every hidden state, gradient, mask, seed and timing it is sent. The
defenses here run on the data owner's side; the audit simulates that trunk owner on the data
owner's own machine and reports what it could read.
"""

from splitcore.privacy.client_secret import ClientSecret
from splitcore.privacy.noise import ChannelNoise, clip_and_noise
from splitcore.privacy.settings import PrivacySettings

__all__ = ["ChannelNoise", "ClientSecret", "PrivacySettings", "clip_and_noise"]
