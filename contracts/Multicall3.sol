// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// @title Multicall3 (subset): `tryAggregate` with the ABI of the Multicall3 deployed at
///        0xcA11bde05977b3631167028862bE2a173976CA11 on public chains.
/// @notice The dev chain places this code at that address (anvil_setCode) so the gateway's
///         ERC-6492 check (an `eth_call` of the wallet factory, then `isValidSignature` on the
///         account it deploys, in one simulated call) runs as it does on Base. Written here
///         from the public ABI; only the function the gateway uses.
contract Multicall3 {
    struct Call {
        address target;
        bytes callData;
    }

    struct Result {
        bool success;
        bytes returnData;
    }

    function tryAggregate(bool requireSuccess, Call[] calldata calls)
        external
        payable
        returns (Result[] memory returnData)
    {
        returnData = new Result[](calls.length);
        for (uint256 i = 0; i < calls.length; i++) {
            (bool success, bytes memory ret) = calls[i].target.call(calls[i].callData);
            if (requireSuccess) {
                require(success, "Multicall3: call failed");
            }
            returnData[i] = Result(success, ret);
        }
    }
}
