// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// The Permit2 entry point this proxy spends through (SignatureTransfer, witness variant).
interface IPermit2Witness {
    struct TokenPermissions {
        address token;
        uint256 amount;
    }

    struct PermitTransferFrom {
        TokenPermissions permitted;
        uint256 nonce;
        uint256 deadline;
    }

    struct SignatureTransferDetails {
        address to;
        uint256 requestedAmount;
    }

    function permitWitnessTransferFrom(
        PermitTransferFrom calldata permit,
        SignatureTransferDetails calldata transferDetails,
        address owner,
        bytes32 witness,
        string calldata witnessTypeString,
        bytes calldata signature
    ) external;
}

/// @title x402ExactPermit2Proxy (subset): the x402 `exact` settlement proxy for ERC-20 tokens
///        without EIP-3009, at 0x402085c248EeA27D92E8b30b2C58ed07f9E20001, written here from the
///        ABI the x402 SDK calls (`settle`, selector 0x13cd3b53).
/// @notice The payer signs a Permit2 PermitWitnessTransferFrom with this proxy as spender, for
///         exactly `permitted.amount`, and a witness {to, validAfter}. Anyone may submit it; the
///         proxy always moves the whole permitted amount and only to `witness.to`, so whoever
///         sends the transaction chooses neither the amount nor the destination.
///         Permit2's address is a constant, not an immutable, and there is no constructor, so the
///         code placed with anvil_setCode works as is. `settleWithPermit` (EIP-2612 sponsoring) is
///         not implemented.
contract X402ExactPermit2Proxy {
    struct Witness {
        address to;
        uint256 validAfter;
    }

    address public constant PERMIT2 = 0x000000000022D473030F116dDEE9F6B43aC78BA3;

    bytes32 public constant WITNESS_TYPEHASH = keccak256("Witness(address to,uint256 validAfter)");
    string public constant WITNESS_TYPE_STRING =
        "Witness witness)TokenPermissions(address token,uint256 amount)Witness(address to,uint256 validAfter)";

    error InvalidAmount();
    error InvalidOwner();
    error InvalidDestination();
    error PaymentTooEarly();

    event Settled();

    function settle(
        IPermit2Witness.PermitTransferFrom calldata permit,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) external {
        if (permit.permitted.amount == 0) revert InvalidAmount();
        if (owner == address(0)) revert InvalidOwner();
        if (witness.to == address(0)) revert InvalidDestination();
        if (block.timestamp < witness.validAfter) revert PaymentTooEarly();
        bytes32 witnessHash = keccak256(abi.encode(WITNESS_TYPEHASH, witness.to, witness.validAfter));
        IPermit2Witness(PERMIT2).permitWitnessTransferFrom(
            permit,
            IPermit2Witness.SignatureTransferDetails({to: witness.to, requestedAmount: permit.permitted.amount}),
            owner,
            witnessHash,
            WITNESS_TYPE_STRING,
            signature
        );
        emit Settled();
    }
}
