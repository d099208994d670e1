// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// @title Misbehaving ERC-1271 wallets, for the gateway's attack tests only.

/// @notice Says every signature is valid. It can only ever authorise spending its own funds.
contract LyingWallet {
    function isValidSignature(bytes32, bytes calldata) external pure returns (bytes4) {
        return 0x1626ba7e;
    }
}

/// @notice Reverts on every signature check.
contract RevertingWallet {
    function isValidSignature(bytes32, bytes calldata) external pure returns (bytes4) {
        revert("RevertingWallet: no");
    }
}
