"""Parameter and multiply-add counts (nfnets.counting) of a scanned network
count every block. (The counts of each model family, and its MACs against
XLA's cost analysis: test_resnet.py and test_regnet.py.)"""

from nfnets import counting
from nfnets import resnet


def test_counting_sees_every_scanned_block():
  counts = {loop: counting.count_params_and_macs(
      resnet.make_config(depths=(1, 5, 1, 1), width=0.25, block_loop=loop), 64)
            for loop in ('unrolled', 'scan')}
  assert counts['scan'] == counts['unrolled']
