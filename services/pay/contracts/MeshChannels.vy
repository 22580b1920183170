# pragma version 0.4.3
# pragma evm-version cancun
"""
@title MeshChannels
@notice One-way payment channels between mesh routers, in the chain's native
        coin or any ERC-20 token. The payer escrows a deposit and releases it
        to the payee in signed cumulative balance proofs (EIP-712 typed data:
        BalanceProof(bytes32 channelId,uint256 nonce,uint256 amount)); the payee
        claims the newest one whenever it likes. The payee can close at once;
        the payer closes through a window in which the payee answers with its
        newest proof. Settling and claiming only credit balances: everyone
        withdraws their own (pull payments), so nobody can block another.
        For gas, every function reads only the fields of a channel it needs
        (each cold storage slot costs 2,100) and open writes no zero field.
"""

from ethereum.ercs import IERC20

struct Channel:
    payer: address
    payee: address
    token: address
    deposit: uint256
    claimed: uint256
    nonce: uint256
    close_window: uint256
    closes_at: uint256
    settled: bool

event ChannelOpened:
    channel_id: indexed(bytes32)
    payer: indexed(address)
    payee: indexed(address)
    token: address
    deposit: uint256
    close_window: uint256

event ChannelToppedUp:
    channel_id: indexed(bytes32)
    added: uint256
    deposit: uint256

event Claimed:
    channel_id: indexed(bytes32)
    nonce: uint256
    amount: uint256

event CloseRequested:
    channel_id: indexed(bytes32)
    closes_at: uint256

event Settled:
    channel_id: indexed(bytes32)
    paid: uint256
    refunded: uint256

event Withdrawn:
    owner: indexed(address)
    token: indexed(address)
    amount: uint256

MIN_CLOSE_WINDOW: constant(uint256) = 1
MAX_CLOSE_WINDOW: constant(uint256) = 30 * 86400
# secp256k1's order halved: a larger s is the malleated twin of a signature
HALF_ORDER: constant(uint256) = 57896044618658097711785492504343953926418782139537452191302581570759080747168
DOMAIN_TYPEHASH: constant(bytes32) = keccak256(
    "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
PROOF_TYPEHASH: constant(bytes32) = keccak256(
    "BalanceProof(bytes32 channelId,uint256 nonce,uint256 amount)")

channels: public(HashMap[bytes32, Channel])
channel_count: public(uint256)
# token -> owner -> what settlements and claims credited it
withdrawable: public(HashMap[address, HashMap[address, uint256]])


@internal
@view
def _domain_separator() -> bytes32:
    return keccak256(abi_encode(DOMAIN_TYPEHASH, keccak256("MeshChannels"), keccak256("1"),
                                chain.id, self))


@external
@view
def domain_separator() -> bytes32:
    return self._domain_separator()


@internal
@payable
def _take(token: address, amount: uint256):
    if token == empty(address):
        assert msg.value == amount, "value is not the amount"
    else:
        assert msg.value == 0, "no coin with a token"
        assert token.is_contract, "token not a contract"
        assert extcall IERC20(token).transferFrom(msg.sender, self, amount, default_return_value=True), "transfer failed"


@external
@payable
def open(payee: address, token: address, amount: uint256, close_window: uint256) -> bytes32:
    assert payee != empty(address) and payee != msg.sender, "bad payee"
    assert amount > 0, "no deposit"
    assert close_window >= MIN_CLOSE_WINDOW and close_window <= MAX_CLOSE_WINDOW, "bad window"
    count: uint256 = self.channel_count + 1
    self.channel_count = count
    channel_id: bytes32 = keccak256(abi_encode(self, chain.id, count))
    # field by field: a whole-struct assignment would also write its five zeros
    self.channels[channel_id].payer = msg.sender
    self.channels[channel_id].payee = payee
    if token != empty(address):
        self.channels[channel_id].token = token
    self.channels[channel_id].deposit = amount
    self.channels[channel_id].close_window = close_window
    self._take(token, amount)
    log ChannelOpened(channel_id=channel_id, payer=msg.sender, payee=payee, token=token,
                      deposit=amount, close_window=close_window)
    return channel_id


@external
@payable
def top_up(channel_id: bytes32, amount: uint256):
    assert self.channels[channel_id].payer == msg.sender, "not payer"
    assert not self.channels[channel_id].settled, "channel settled"
    assert self.channels[channel_id].closes_at == 0, "channel closing"
    assert amount > 0, "no deposit"
    deposit: uint256 = self.channels[channel_id].deposit + amount
    self.channels[channel_id].deposit = deposit
    self._take(self.channels[channel_id].token, amount)
    log ChannelToppedUp(channel_id=channel_id, added=amount, deposit=deposit)


@internal
@view
def _signer(channel_id: bytes32, nonce: uint256, amount: uint256, signature: Bytes[65]) -> address:
    r: uint256 = convert(slice(signature, 0, 32), uint256)
    s: uint256 = convert(slice(signature, 32, 32), uint256)
    v: uint256 = convert(slice(signature, 64, 1), uint256)
    assert v == 27 or v == 28, "bad signature v"
    assert s > 0 and s <= HALF_ORDER, "malleable signature"
    digest: bytes32 = keccak256(concat(
        b"\x19\x01", self._domain_separator(),
        keccak256(abi_encode(PROOF_TYPEHASH, channel_id, nonce, amount))))
    return ecrecover(digest, v, r, s)


@external
def claim(channel_id: bytes32, nonce: uint256, amount: uint256, signature: Bytes[65]):
    """Credit the payee up to a newer proof; anyone may send it, it only pays the payee."""
    payer: address = self.channels[channel_id].payer
    assert payer != empty(address), "no such channel"
    assert not self.channels[channel_id].settled, "channel settled"
    closes_at: uint256 = self.channels[channel_id].closes_at
    assert closes_at == 0 or block.timestamp <= closes_at, "window over"
    assert nonce > self.channels[channel_id].nonce, "stale nonce"
    claimed: uint256 = self.channels[channel_id].claimed
    assert amount >= claimed, "amount decreased"
    assert amount <= self.channels[channel_id].deposit, "exceeds deposit"
    # ecrecover gives empty(address) for a bad signature; payer is never empty here
    assert self._signer(channel_id, nonce, amount, signature) == payer, "wrong signer"
    self.channels[channel_id].nonce = nonce
    self.channels[channel_id].claimed = amount
    token: address = self.channels[channel_id].token
    payee: address = self.channels[channel_id].payee
    self.withdrawable[token][payee] += amount - claimed
    log Claimed(channel_id=channel_id, nonce=nonce, amount=amount)


@internal
def _settle(channel_id: bytes32, payer: address):
    self.channels[channel_id].settled = True
    paid: uint256 = self.channels[channel_id].claimed
    refund: uint256 = self.channels[channel_id].deposit - paid
    self.withdrawable[self.channels[channel_id].token][payer] += refund
    log Settled(channel_id=channel_id, paid=paid, refunded=refund)


@external
def close(channel_id: bytes32):
    """The payee: settle now (it gives up what it has not claimed). The payer:
    start the window in which the payee can still claim."""
    assert not self.channels[channel_id].settled, "channel settled"
    payer: address = self.channels[channel_id].payer
    if msg.sender == self.channels[channel_id].payee:
        self._settle(channel_id, payer)
    elif msg.sender == payer:
        assert self.channels[channel_id].closes_at == 0, "already closing"
        closes_at: uint256 = block.timestamp + self.channels[channel_id].close_window
        self.channels[channel_id].closes_at = closes_at
        log CloseRequested(channel_id=channel_id, closes_at=closes_at)
    else:
        raise "not a party"


@external
def settle(channel_id: bytes32):
    """After the payer's window: anyone may settle."""
    assert not self.channels[channel_id].settled, "channel settled"
    closes_at: uint256 = self.channels[channel_id].closes_at
    assert closes_at != 0 and block.timestamp > closes_at, "window not over"
    self._settle(channel_id, self.channels[channel_id].payer)


@external
@nonreentrant
def withdraw(token: address):
    amount: uint256 = self.withdrawable[token][msg.sender]
    assert amount > 0, "nothing to withdraw"
    self.withdrawable[token][msg.sender] = 0
    if token == empty(address):
        raw_call(msg.sender, b"", value=amount)
    else:
        assert extcall IERC20(token).transfer(msg.sender, amount, default_return_value=True), "transfer failed"
    log Withdrawn(owner=msg.sender, token=token, amount=amount)
