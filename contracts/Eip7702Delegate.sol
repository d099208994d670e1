// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// @title Eip7702Delegate: code an EOA delegates to (EIP-7702) on the dev chain.
/// @notice Runs in the delegating account's context, so `address(this)` is the EOA: a signature
///         is valid (ERC-1271) when it is that account's own 65-byte ECDSA signature (low s) over
///         the digest. This is the "strict" delegate tokens like USDC v2.2 meet: they ask
///         `isValidSignature` of any account with code, a delegated EOA included.
contract Eip7702Delegate {
    bytes4 private constant ERC1271_MAGIC_VALUE = 0x1626ba7e;
    uint256 private constant SECP256K1_HALF_ORDER =
        0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    function isValidSignature(bytes32 digest, bytes calldata signature) external view returns (bytes4) {
        if (signature.length != 65) {
            return bytes4(0xffffffff);
        }
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        if (uint256(s) > SECP256K1_HALF_ORDER || (v != 27 && v != 28)) {
            return bytes4(0xffffffff);
        }
        address signer = ecrecover(digest, v, r, s);
        return signer != address(0) && signer == address(this) ? ERC1271_MAGIC_VALUE : bytes4(0xffffffff);
    }
}
