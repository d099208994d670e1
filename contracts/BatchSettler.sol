// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// @dev The one EIP-3009 entry point the batch needs (USDC's FiatTokenV2 and TestUSDC have it).
interface IEIP3009 {
    function transferWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external;
}

/// @title BatchSettler: many EIP-3009 settlements in one transaction.
/// @notice Each item is still the payer's own `transferWithAuthorization` (the token checks the
///         signature, window and nonce, and moves the money to the signed `to`); this contract
///         only loops, isolating each call with try/catch so one failing transfer does not undo
///         the others, and reports each item's outcome as an event the gateway reads from the
///         receipt.
/// @dev Only `settler` may call `settle`. An open contract could not steal (every transfer is
///      authorised by its payer's signature, to the signed recipient), but a third party could
///      then emit `Settled`/`Failed` events from this address for authorizations it copied from
///      the mempool; restricting the caller keeps every event here the gateway's own.
///      Each item's call is capped at `ITEM_GAS`: the token asks a payer with code (a contract
///      wallet, an EIP-7702 delegated EOA) `isValidSignature`, and that code can burn whatever gas
///      it is given. Capped, one such item costs at most `ITEM_GAS` and fails alone; an item that
///      could not be given its full `ITEM_GAS` is not called at all (it fails with
///      "BatchSettler: out of gas"), so the batch transaction itself never runs out of gas.
contract BatchSettler {
    struct Authorization {
        address from;
        address to;
        uint256 value;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
        uint8 v;
        bytes32 r;
        bytes32 s;
    }

    address public immutable settler;

    /// @notice Gas each item's `transferWithAuthorization` may use: a USDC transfer with an
    ///         ERC-1271 / EIP-7702 signature check and a recipient's first credit measured ≈ 66 k.
    uint256 public constant ITEM_GAS = 90_000;
    /// @notice Gas an item needs besides its call: the call's own cost, its event and the loop.
    uint256 public constant ITEM_RESERVE = 15_000;

    event Settled(uint256 indexed index, address indexed from, bytes32 indexed nonce);
    event Failed(uint256 indexed index, address indexed from, bytes32 indexed nonce, bytes reason);

    constructor(address settler_) {
        require(settler_ != address(0), "BatchSettler: zero settler");
        settler = settler_;
    }

    /// @return settled how many items moved money.
    function settle(IEIP3009 token, Authorization[] calldata auths) external returns (uint256 settled) {
        require(msg.sender == settler, "BatchSettler: caller is not the settler");
        uint256 count = auths.length;
        for (uint256 i = 0; i < count; ++i) {
            Authorization calldata a = auths[i];
            // EIP-150: a call gets at most 63/64 of what is left; below this, ITEM_GAS is not certain.
            if (gasleft() < ITEM_GAS + ITEM_GAS / 63 + ITEM_RESERVE) {
                emit Failed(i, a.from, a.nonce, abi.encodeWithSignature("Error(string)", "BatchSettler: out of gas"));
                continue;
            }
            try token.transferWithAuthorization{gas: ITEM_GAS}(
                a.from, a.to, a.value, a.validAfter, a.validBefore, a.nonce, a.v, a.r, a.s
            ) {
                emit Settled(i, a.from, a.nonce);
                ++settled;
            } catch (bytes memory reason) {
                emit Failed(i, a.from, a.nonce, reason);
            }
        }
    }
}
