# pragma version 0.4.3
# A channel party that refuses every transfer of coin to it: with pushed
# payments it could block a settlement; with pulled ones it cannot.

interface Channels:
    def open(payee: address, token: address, amount: uint256, close_window: uint256) -> bytes32: payable
    def close(channel_id: bytes32): nonpayable

channels: Channels


@deploy
def __init__(channels: address):
    self.channels = Channels(channels)


@external
@payable
def open(payee: address, close_window: uint256) -> bytes32:
    return extcall self.channels.open(payee, empty(address), msg.value, close_window, value=msg.value)


@external
def close(channel_id: bytes32):
    extcall self.channels.close(channel_id)


@external
@payable
def __default__():
    raise "refused"
