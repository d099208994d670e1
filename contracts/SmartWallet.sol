// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// @title SmartWallet: a minimal ERC-1271 contract wallet for the dev chain.
/// @notice Holds tokens; a signature is valid when it is its owner's 65-byte ECDSA signature
///         (r||s||v, low s) over the digest itself. The owner can move anything with `execute`.
///         Test-only: no modules, no recovery, no upgrades.
contract SmartWallet {
    bytes4 private constant ERC1271_MAGIC_VALUE = 0x1626ba7e;
    uint256 private constant SECP256K1_HALF_ORDER =
        0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    address public immutable owner;

    constructor(address walletOwner) {
        owner = walletOwner;
    }

    function isValidSignature(bytes32 digest, bytes calldata signature) external view returns (bytes4) {
        return recoverSigner(digest, signature) == owner ? ERC1271_MAGIC_VALUE : bytes4(0xffffffff);
    }

    function execute(address target, uint256 value, bytes calldata data) external returns (bytes memory) {
        require(msg.sender == owner, "SmartWallet: caller is not the owner");
        (bool ok, bytes memory result) = target.call{value: value}(data);
        require(ok, "SmartWallet: call failed");
        return result;
    }

    receive() external payable {}

    /// The ECDSA signer of `digest`, or address(0) for anything that is not a low-s 65-byte signature.
    function recoverSigner(bytes32 digest, bytes calldata signature) public pure returns (address) {
        if (signature.length != 65) {
            return address(0);
        }
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        if (uint256(s) > SECP256K1_HALF_ORDER || (v != 27 && v != 28)) {
            return address(0);
        }
        return ecrecover(digest, v, r, s);
    }
}

/// @title SmartWalletFactory: CREATE2 deployer of SmartWallets, as ERC-6492 counterfactual
///        signatures name it. Deploying an account that exists returns it instead of reverting
///        (as the widely used account factories do), so a 6492 prepare call is harmless twice.
contract SmartWalletFactory {
    event AccountCreated(address indexed account, address indexed owner, uint256 salt);

    function createAccount(address owner, uint256 salt) external returns (address account) {
        account = getAddress(owner, salt);
        if (account.code.length > 0) {
            return account;
        }
        SmartWallet created = new SmartWallet{salt: bytes32(salt)}(owner);
        require(address(created) == account, "SmartWalletFactory: unexpected address");
        emit AccountCreated(account, owner, salt);
    }

    function getAddress(address owner, uint256 salt) public view returns (address) {
        bytes32 initCodeHash = keccak256(abi.encodePacked(type(SmartWallet).creationCode, abi.encode(owner)));
        return address(
            uint160(uint256(keccak256(abi.encodePacked(bytes1(0xff), address(this), bytes32(salt), initCodeHash))))
        );
    }
}
