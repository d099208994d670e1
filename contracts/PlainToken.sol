// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// @title PlainToken: a bare ERC-20 for the dev chain, with no EIP-3009 and no EIP-712 domain.
/// @notice What most ERC-20 tokens are: transfer, approve, transferFrom, and nothing to sign.
///         x402 `exact` pays such a token only through Permit2 (assetTransferMethod "permit2").
///         Test-only: the constructor mints `amount` to each of `holders`; there is no other mint.
///         Storage: name (slot 0), symbol (1), totalSupply (2), balances (3), allowances (4).
contract PlainToken {
    string public name;
    string public symbol;
    uint256 public totalSupply;
    mapping(address => uint256) public balanceOf;
    mapping(address => mapping(address => uint256)) public allowance;
    uint8 public immutable decimals;

    event Transfer(address indexed from, address indexed to, uint256 value);
    event Approval(address indexed owner, address indexed spender, uint256 value);

    constructor(string memory tokenName, string memory tokenSymbol, uint8 tokenDecimals, address[] memory holders, uint256 amount) {
        name = tokenName;
        symbol = tokenSymbol;
        decimals = tokenDecimals;
        for (uint256 i = 0; i < holders.length; i++) {
            balanceOf[holders[i]] += amount;
            totalSupply += amount;
            emit Transfer(address(0), holders[i], amount);
        }
    }

    function transfer(address to, uint256 value) external returns (bool) {
        _move(msg.sender, to, value);
        return true;
    }

    function approve(address spender, uint256 value) external returns (bool) {
        allowance[msg.sender][spender] = value;
        emit Approval(msg.sender, spender, value);
        return true;
    }

    function transferFrom(address from, address to, uint256 value) external returns (bool) {
        uint256 allowed = allowance[from][msg.sender];
        if (allowed != type(uint256).max) {
            require(allowed >= value, "ERC20: insufficient allowance");
            allowance[from][msg.sender] = allowed - value;
        }
        _move(from, to, value);
        return true;
    }

    function _move(address from, address to, uint256 value) private {
        require(to != address(0), "ERC20: transfer to the zero address");
        require(balanceOf[from] >= value, "ERC20: transfer amount exceeds balance");
        balanceOf[from] -= value;
        balanceOf[to] += value;
        emit Transfer(from, to, value);
    }
}
