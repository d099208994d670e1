// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// x402 `batch-settlement` escrow, written here against the spec's interface (the x402 SDK 2.25
/// `batch_settlement/abi.py` surface and EIP-712 types): a payer deposits into a channel once, signs
/// cumulative `Voucher`s off chain, and the receiver claims many of them in one transaction.
///
/// No constructor state and no immutables: the EIP-712 domain is computed from `address(this)` and
/// `block.chainid` per call, so the dev chain places the runtime code at the canonical address
/// (0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003) with `anvil_setCode`.
///
/// Money: `channels[id].balance` is what the payer deposited and has not taken back;
/// `totalClaimed` (never above the balance) is what the receiver has claimed of it; a claim credits
/// `receivers[receiver][token].totalClaimed` and `settle` pays the receiver what is claimed and not
/// yet settled. The unclaimed rest goes back to the payer: by the receiver (`refund`, or
/// `refundWithSignature` by its authorizer's signature) or by the payer alone after `withdrawDelay`
/// (`initiateWithdraw`, then `finalizeWithdraw`).

interface IERC20Minimal {
    function balanceOf(address account) external view returns (uint256);
    function transfer(address to, uint256 value) external returns (bool);
}

interface IDepositCollector {
    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata data) external;
}

interface IERC1271 {
    function isValidSignature(bytes32 digest, bytes calldata signature) external view returns (bytes4);
}

contract X402BatchSettlement {
    struct ChannelConfig {
        address payer;
        address payerAuthorizer;
        address receiver;
        address receiverAuthorizer;
        address token;
        uint40 withdrawDelay;
        bytes32 salt;
    }

    struct Voucher {
        ChannelConfig channel;
        uint128 maxClaimableAmount;
    }

    struct VoucherClaim {
        Voucher voucher;
        bytes signature;
        uint128 totalClaimed;
    }

    struct ChannelState {
        uint128 balance;
        uint128 totalClaimed;
    }

    struct PendingWithdrawal {
        uint128 amount;
        uint40 initiatedAt;
    }

    struct ReceiverState {
        uint128 totalClaimed;
        uint128 totalSettled;
    }

    uint40 public constant MIN_WITHDRAW_DELAY = 900;
    uint40 public constant MAX_WITHDRAW_DELAY = 2_592_000;

    bytes32 private constant DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 private constant NAME_HASH = keccak256("x402 Batch Settlement");
    bytes32 private constant VERSION_HASH = keccak256("1");
    bytes32 private constant CHANNEL_CONFIG_TYPEHASH = keccak256(
        "ChannelConfig(address payer,address payerAuthorizer,address receiver,address receiverAuthorizer,"
        "address token,uint40 withdrawDelay,bytes32 salt)"
    );
    bytes32 private constant VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint128 maxClaimableAmount)");
    bytes32 private constant REFUND_TYPEHASH = keccak256("Refund(bytes32 channelId,uint256 nonce,uint128 amount)");
    bytes32 private constant CLAIM_ENTRY_TYPEHASH =
        keccak256("ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)");
    bytes32 private constant CLAIM_BATCH_TYPEHASH = keccak256(
        "ClaimBatch(ClaimEntry[] claims)ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)"
    );
    uint256 private constant HALF_ORDER = 0x7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0;

    mapping(bytes32 => ChannelState) public channels;
    mapping(bytes32 => PendingWithdrawal) public pendingWithdrawals;
    mapping(address => mapping(address => ReceiverState)) public receivers;
    mapping(bytes32 => uint256) public refundNonce;
    // Set while a deposit's collector runs: the collector is the caller's choice, and one that called
    // deposit again before paying had its one transfer counted by both deposits (the balance check
    // below sees the same tokens twice).
    bool private depositing;

    event Deposited(bytes32 indexed channelId, address indexed payer, uint128 amount, uint128 balance);
    event Claimed(bytes32 indexed channelId, address indexed receiver, uint128 amount, uint128 totalClaimed);
    event Settled(address indexed receiver, address indexed token, address indexed sender, uint128 amount);
    event WithdrawInitiated(bytes32 indexed channelId, uint128 amount, uint40 initiatedAt);
    event Withdrawn(bytes32 indexed channelId, address indexed payer, uint128 amount);
    event Refunded(bytes32 indexed channelId, address indexed payer, uint128 amount, uint256 nonce);

    error InvalidAmount();
    error InvalidWithdrawDelay();
    error DepositNotReceived();
    error InvalidVoucherSignature();
    error InvalidAuthorizerSignature();
    error ClaimExceedsVoucher();
    error ClaimExceedsBalance();
    error NotAuthorized();
    error NoPendingWithdrawal();
    error WithdrawDelayNotElapsed();
    error InvalidRefundNonce();
    error TransferFailed();
    error Reentrancy();

    // ------------------------------------------------------------------------------- batching

    /// Several calls of this contract in one transaction (claim then settle), each as if sent alone.
    function multicall(bytes[] calldata data) external returns (bytes[] memory results) {
        results = new bytes[](data.length);
        for (uint256 i = 0; i < data.length; i++) {
            (bool ok, bytes memory result) = address(this).delegatecall(data[i]);
            if (!ok) {
                assembly {
                    revert(add(result, 0x20), mload(result))
                }
            }
            results[i] = result;
        }
    }

    // ------------------------------------------------------------------------------- deposit

    /// Funds the channel of `config` with `amount`, pulled from the payer by `collector` (which
    /// must hand this contract the tokens: the balance is checked, not the collector trusted).
    /// A deposit cancels a pending withdrawal.
    function deposit(ChannelConfig calldata config, uint128 amount, address collector, bytes calldata collectorData)
        external
    {
        if (amount == 0) revert InvalidAmount();
        if (config.withdrawDelay < MIN_WITHDRAW_DELAY || config.withdrawDelay > MAX_WITHDRAW_DELAY) {
            revert InvalidWithdrawDelay();
        }
        bytes32 channelId = getChannelId(config);
        IERC20Minimal token = IERC20Minimal(config.token);
        if (depositing) revert Reentrancy();
        depositing = true;
        uint256 before = token.balanceOf(address(this));
        IDepositCollector(collector).collect(config.payer, config.token, amount, channelId, collectorData);
        if (token.balanceOf(address(this)) < before + amount) revert DepositNotReceived();
        depositing = false;
        ChannelState storage state = channels[channelId];
        state.balance += amount;
        delete pendingWithdrawals[channelId];
        emit Deposited(channelId, config.payer, amount, state.balance);
    }

    // ------------------------------------------------------------------------------- claims

    /// Claims signed for by the receivers' authorizer (one signature over the whole batch).
    function claimWithSignature(VoucherClaim[] calldata voucherClaims, bytes calldata authorizerSignature) external {
        address authorizer = _recover(getClaimBatchDigest(voucherClaims), authorizerSignature);
        for (uint256 i = 0; i < voucherClaims.length; i++) {
            if (authorizer == address(0) || authorizer != voucherClaims[i].voucher.channel.receiverAuthorizer) {
                revert InvalidAuthorizerSignature();
            }
            _claim(voucherClaims[i]);
        }
    }

    /// Claims sent by the receivers' authorizer itself.
    function claim(VoucherClaim[] calldata voucherClaims) external {
        for (uint256 i = 0; i < voucherClaims.length; i++) {
            if (msg.sender != voucherClaims[i].voucher.channel.receiverAuthorizer) revert NotAuthorized();
            _claim(voucherClaims[i]);
        }
    }

    /// One claim: a row at or below what is already claimed is skipped (a replay claims nothing).
    function _claim(VoucherClaim calldata c) private {
        ChannelConfig calldata config = c.voucher.channel;
        bytes32 channelId = getChannelId(config);
        ChannelState storage state = channels[channelId];
        uint128 claimed = state.totalClaimed;
        if (c.totalClaimed <= claimed) return;
        if (c.totalClaimed > c.voucher.maxClaimableAmount) revert ClaimExceedsVoucher();
        if (c.totalClaimed > state.balance) revert ClaimExceedsBalance();
        bytes32 digest = getVoucherDigest(channelId, c.voucher.maxClaimableAmount);
        if (!_signedBy(config.payerAuthorizer, config.payer, digest, c.signature)) revert InvalidVoucherSignature();
        uint128 amount = c.totalClaimed - claimed;
        state.totalClaimed = c.totalClaimed;
        receivers[config.receiver][config.token].totalClaimed += amount;
        emit Claimed(channelId, config.receiver, amount, c.totalClaimed);
    }

    /// Pays `receiver` what it has claimed of `token` and not been paid; nothing due is a no-op.
    function settle(address receiver, address token) external {
        ReceiverState storage state = receivers[receiver][token];
        uint128 amount = state.totalClaimed - state.totalSettled;
        if (amount == 0) return;
        state.totalSettled = state.totalClaimed;
        _transfer(token, receiver, amount);
        emit Settled(receiver, token, msg.sender, amount);
    }

    // ------------------------------------------------------------------------------- leaving

    /// The payer (or its authorizer) asks for `amount` back; after `withdrawDelay` it may be taken.
    function initiateWithdraw(ChannelConfig calldata config, uint128 amount) external {
        if (msg.sender != config.payer && msg.sender != config.payerAuthorizer) revert NotAuthorized();
        if (amount == 0) revert InvalidAmount();
        bytes32 channelId = getChannelId(config);
        pendingWithdrawals[channelId] = PendingWithdrawal(amount, uint40(block.timestamp));
        emit WithdrawInitiated(channelId, amount, uint40(block.timestamp));
    }

    /// Pays the payer its pending withdrawal, capped to what is not claimed.
    function finalizeWithdraw(ChannelConfig calldata config) external {
        bytes32 channelId = getChannelId(config);
        PendingWithdrawal memory pending = pendingWithdrawals[channelId];
        if (pending.initiatedAt == 0) revert NoPendingWithdrawal();
        if (block.timestamp < uint256(pending.initiatedAt) + config.withdrawDelay) revert WithdrawDelayNotElapsed();
        delete pendingWithdrawals[channelId];
        uint128 amount = _takeUnclaimed(channelId, pending.amount);
        _transfer(config.token, config.payer, amount);
        emit Withdrawn(channelId, config.payer, amount);
    }

    /// The receiver (or its authorizer) gives back up to `amount` of what it has not claimed.
    function refund(ChannelConfig calldata config, uint128 amount) external {
        if (msg.sender != config.receiver && msg.sender != config.receiverAuthorizer) revert NotAuthorized();
        bytes32 channelId = getChannelId(config);
        _refund(config, channelId, amount, refundNonce[channelId]++);
    }

    /// Anyone may submit a refund the receiver's authorizer signed for this nonce (bumped first).
    function refundWithSignature(
        ChannelConfig calldata config,
        uint128 amount,
        uint256 nonce,
        bytes calldata receiverAuthorizerSignature
    ) external {
        bytes32 channelId = getChannelId(config);
        if (nonce != refundNonce[channelId]) revert InvalidRefundNonce();
        refundNonce[channelId] = nonce + 1;
        address signer = _recover(getRefundDigest(channelId, nonce, amount), receiverAuthorizerSignature);
        if (signer == address(0) || signer != config.receiverAuthorizer) revert InvalidAuthorizerSignature();
        _refund(config, channelId, amount, nonce);
    }

    function _refund(ChannelConfig calldata config, bytes32 channelId, uint128 amount, uint256 nonce) private {
        uint128 paid = _takeUnclaimed(channelId, amount);
        delete pendingWithdrawals[channelId];
        _transfer(config.token, config.payer, paid);
        emit Refunded(channelId, config.payer, paid, nonce);
    }

    function _takeUnclaimed(bytes32 channelId, uint128 amount) private returns (uint128) {
        ChannelState storage state = channels[channelId];
        uint128 unclaimed = state.balance - state.totalClaimed;
        uint128 taken = amount < unclaimed ? amount : unclaimed;
        state.balance -= taken;
        return taken;
    }

    // ------------------------------------------------------------------------------- views

    function domainSeparator() public view returns (bytes32) {
        return keccak256(abi.encode(DOMAIN_TYPEHASH, NAME_HASH, VERSION_HASH, block.chainid, address(this)));
    }

    function getChannelId(ChannelConfig calldata c) public view returns (bytes32) {
        bytes32 structHash = keccak256(
            abi.encode(
                CHANNEL_CONFIG_TYPEHASH, c.payer, c.payerAuthorizer, c.receiver, c.receiverAuthorizer, c.token,
                c.withdrawDelay, c.salt
            )
        );
        return _typed(structHash);
    }

    function getVoucherDigest(bytes32 channelId, uint128 maxClaimableAmount) public view returns (bytes32) {
        return _typed(keccak256(abi.encode(VOUCHER_TYPEHASH, channelId, maxClaimableAmount)));
    }

    function getRefundDigest(bytes32 channelId, uint256 nonce, uint128 amount) public view returns (bytes32) {
        return _typed(keccak256(abi.encode(REFUND_TYPEHASH, channelId, nonce, amount)));
    }

    function getClaimBatchDigest(VoucherClaim[] calldata voucherClaims) public view returns (bytes32) {
        bytes32[] memory entries = new bytes32[](voucherClaims.length);
        for (uint256 i = 0; i < voucherClaims.length; i++) {
            VoucherClaim calldata c = voucherClaims[i];
            entries[i] = keccak256(
                abi.encode(
                    CLAIM_ENTRY_TYPEHASH, getChannelId(c.voucher.channel), c.voucher.maxClaimableAmount, c.totalClaimed
                )
            );
        }
        return _typed(keccak256(abi.encode(CLAIM_BATCH_TYPEHASH, keccak256(abi.encodePacked(entries)))));
    }

    // ------------------------------------------------------------------------------- internal

    function _typed(bytes32 structHash) private view returns (bytes32) {
        return keccak256(abi.encodePacked("\x19\x01", domainSeparator(), structHash));
    }

    /// A voucher is signed by the payer's authorizer (ECDSA); with none (zero), by the payer: a
    /// contract payer through ERC-1271, an account without code through ECDSA.
    function _signedBy(address authorizer, address payer, bytes32 digest, bytes calldata signature)
        private
        view
        returns (bool)
    {
        if (authorizer != address(0)) {
            address recovered = _recover(digest, signature);
            return recovered != address(0) && recovered == authorizer;
        }
        if (payer.code.length > 0) {
            try IERC1271(payer).isValidSignature(digest, signature) returns (bytes4 magic) {
                return magic == IERC1271.isValidSignature.selector;
            } catch {
                return false;
            }
        }
        address signer = _recover(digest, signature);
        return signer != address(0) && signer == payer;
    }

    /// ecrecover of r‖s‖v, refusing high-s and v other than 27/28 (zero address when refused).
    function _recover(bytes32 digest, bytes calldata signature) private pure returns (address) {
        if (signature.length != 65) return address(0);
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        if (uint256(s) > HALF_ORDER || (v != 27 && v != 28)) return address(0);
        return ecrecover(digest, v, r, s);
    }

    function _transfer(address token, address to, uint128 amount) private {
        if (amount == 0) return;
        (bool ok, bytes memory result) = token.call(abi.encodeCall(IERC20Minimal.transfer, (to, amount)));
        if (!ok || (result.length > 0 && !abi.decode(result, (bool)))) revert TransferFailed();
    }
}

/// Pulls an ERC-3009 `receiveWithAuthorization` deposit for the batch settlement contract only:
/// the payer signed `ReceiveWithAuthorization(from=payer, to=this collector, value, validAfter,
/// validBefore, nonce)` with nonce = keccak256(abi.encode(channelId, salt)), so the authorization
/// funds that one channel and nothing else. Placed at 0x4020806089470a89826cB9fB1f4059150b550004.
contract ERC3009DepositCollector {
    address public constant BATCH_SETTLEMENT = 0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003;

    error OnlyBatchSettlement();

    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata data) external {
        if (msg.sender != BATCH_SETTLEMENT) revert OnlyBatchSettlement();
        (uint256 validAfter, uint256 validBefore, uint256 salt, bytes memory signature) =
            abi.decode(data, (uint256, uint256, uint256, bytes));
        bytes32 nonce = keccak256(abi.encode(channelId, salt));
        IERC3009(token).receiveWithAuthorization(payer, address(this), amount, validAfter, validBefore, nonce, signature);
        (bool ok, bytes memory result) = token.call(abi.encodeCall(IERC20Minimal.transfer, (msg.sender, amount)));
        require(ok && (result.length == 0 || abi.decode(result, (bool))), "collector: transfer failed");
    }
}

interface IERC3009 {
    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature
    ) external;
}
