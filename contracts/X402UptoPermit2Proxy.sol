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

/// @title x402UptoPermit2Proxy (subset): the x402 `upto` settlement proxy at
///        0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002, written here from the ABI the x402 SDK calls
///        (`settle`, selector 0xff11e7b4).
/// @notice The payer signs a Permit2 PermitWitnessTransferFrom with this proxy as spender, up to
///         `permitted.amount`, and a witness {to, facilitator, validAfter}. Only the facilitator
///         named in the witness may settle, for any `amount` in (0, permitted.amount], and the money
///         goes only to `witness.to`: the facilitator picks the amount, never the destination.
///         Permit2's address is a constant, not an immutable, and there is no constructor, so the
///         code placed with anvil_setCode works as is. `settleWithPermit` (EIP-2612 sponsoring) is
///         not implemented.
contract X402UptoPermit2Proxy {
    struct Witness {
        address to;
        address facilitator;
        uint256 validAfter;
    }

    address public constant PERMIT2 = 0x000000000022D473030F116dDEE9F6B43aC78BA3;

    bytes32 public constant WITNESS_TYPEHASH = keccak256("Witness(address to,address facilitator,uint256 validAfter)");
    string public constant WITNESS_TYPE_STRING =
        "Witness witness)TokenPermissions(address token,uint256 amount)Witness(address to,address facilitator,uint256 validAfter)";

    error InvalidAmount();
    error InvalidOwner();
    error InvalidDestination();
    error PaymentTooEarly();
    error AmountExceedsPermitted();
    error UnauthorizedFacilitator();

    event Settled();

    function settle(
        IPermit2Witness.PermitTransferFrom calldata permit,
        uint256 amount,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) external {
        if (amount == 0) revert InvalidAmount();
        if (owner == address(0)) revert InvalidOwner();
        if (witness.to == address(0)) revert InvalidDestination();
        if (block.timestamp < witness.validAfter) revert PaymentTooEarly();
        if (amount > permit.permitted.amount) revert AmountExceedsPermitted();
        if (msg.sender != witness.facilitator) revert UnauthorizedFacilitator();
        bytes32 witnessHash = keccak256(abi.encode(WITNESS_TYPEHASH, witness.to, witness.facilitator, witness.validAfter));
        IPermit2Witness(PERMIT2).permitWitnessTransferFrom(
            permit,
            IPermit2Witness.SignatureTransferDetails({to: witness.to, requestedAmount: amount}),
            owner,
            witnessHash,
            WITNESS_TYPE_STRING,
            signature
        );
        emit Settled();
    }
}
